"""Class-conditional diffusion on diffusers: the UNet from a recipe, the one sampling loop, save/load.

The model is a `diffusers.UNet2DModel` with `num_class_embeds = num_classes + 1`: the extra
index is the *null class* the objective swaps labels to with probability `cond_dropout`, so the
same network predicts both the conditional and the unconditional noise and classifier-free
guidance needs no second model. A model folder is a `DDPMPipeline` layout (model_index.json,
unet/, scheduler/) plus `genforge.json` with the class names, so
`DDPMPipeline.from_pretrained(dir)` / `UNet2DModel.from_pretrained(dir / "unet")` load it as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from pydantic import Field

from genforge.common.config import Spec, rng, to_dict
from genforge.common.errors import ConfigError, GenforgeError, RunError

META_FILE = "genforge.json"
SAMPLERS = ("ddim", "ddpm")
MAX_GUIDANCE = 20.0


class DiffusionSpec(Spec):
    """The recipe's `model:` section for family diffusion."""

    sample_size: int | None = rng(None, min=4, help="image side; default: the dataset's")
    channels: int | None = rng(None, min=1, max=4, help="default: the dataset's")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = rng(2, min=1, max=4)
    attention_levels: list[int] = Field(default_factory=lambda: [2])
    attention_head_dim: int = rng(8, min=1)
    norm_groups: int = rng(8, min=1)
    dropout: float = rng(0.0, min=0, max=0.9)
    num_classes: int | None = rng(None, min=0, help="0: unconditional; default: the dataset's classes")
    cond_dropout: float = rng(0.1, min=0, max=1, help="share of labels swapped to the null class")
    num_train_timesteps: int = rng(1000, min=2, max=10000)
    beta_schedule: str = rng("squaredcos_cap_v2", choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    prediction_type: str = rng("epsilon", choices=["epsilon", "v_prediction", "sample"])

    def check(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1:
            raise ConfigError("model.block_out_channels: give at least one level, e.g. [32, 64, 64]")
        for i, c in enumerate(self.block_out_channels):
            if c < 1 or c % self.norm_groups:
                raise ConfigError(f"model.block_out_channels[{i}]: {c} must be a positive multiple of "
                                  f"model.norm_groups ({self.norm_groups})")
        for i, lv in enumerate(self.attention_levels):
            if not 0 <= lv < levels:
                raise ConfigError(f"model.attention_levels[{i}]: level {lv} does not exist "
                                  f"(levels are 0..{levels - 1})")
        if self.sample_size is not None and self.sample_size % 2 ** (levels - 1):
            raise ConfigError(f"model.sample_size: {self.sample_size} must be divisible by "
                              f"{2 ** (levels - 1)} ({levels} levels halve it {levels - 1} times)")
        if self.cond_dropout == 1.0 and self.num_classes:
            raise ConfigError("model.cond_dropout: 1.0 would never train the conditional model; use < 1")

    def resolved(self, *, sample_size: int, channels: int, num_classes: int) -> DiffusionSpec:
        """This spec with the dataset's defaults filled in (and checked again)."""
        spec = DiffusionSpec(**{**to_dict(self),
                                "sample_size": self.sample_size or sample_size,
                                "channels": self.channels or channels,
                                "num_classes": num_classes if self.num_classes is None else self.num_classes})
        return spec  # constructing it ran check() again


def build_unet(spec: DiffusionSpec) -> UNet2DModel:
    """A UNet2DModel whose levels, attention and class embedding come from `spec` (resolved)."""
    if spec.sample_size is None or spec.channels is None or spec.num_classes is None:
        raise ConfigError("build_unet: resolve the spec against the dataset first (DiffusionSpec.resolved)")
    levels = len(spec.block_out_channels)
    down = tuple("AttnDownBlock2D" if i in spec.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if (levels - 1 - i) in spec.attention_levels else "UpBlock2D"
               for i in range(levels))
    return UNet2DModel(
        sample_size=spec.sample_size, in_channels=spec.channels, out_channels=spec.channels,
        block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=spec.norm_groups,
        attention_head_dim=spec.attention_head_dim, dropout=spec.dropout,
        # one extra embedding row: the null class used for unconditional / guided sampling
        num_class_embeds=spec.num_classes + 1 if spec.num_classes else None,
    )


def build_scheduler(spec: DiffusionSpec) -> DDPMScheduler:
    # "trailing" spacing makes a few-step DDIM start at the last (pure-noise) timestep
    return DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type=spec.prediction_type, clip_sample=True, timestep_spacing="trailing")


def sample_generators(seed: int, n: int) -> list[torch.Generator]:
    """One CPU generator per sample, so sample i depends on (seed, i) only, not on n or batching."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63) for i in range(n)]


class ClassNamesMixin:
    """Class names and the lookup every image generator shares (CLI, API and jobs use it)."""

    family: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def resolve_class(self, label: str | int | None) -> int | None:
        """A class name or index (as given on a command line or in a request) -> index."""
        if label is None:
            return None
        if not self.conditional:
            raise GenforgeError(f"class: this {self.family} model is unconditional; leave out the class", param="class")
        text = str(label).strip()
        if text in self.class_names:
            return self.class_names.index(text)
        if text.lstrip("-").isdigit() and 0 <= int(text) < self.num_classes:
            return int(text)
        shown = ", ".join(self.class_names[:20]) + (" ..." if self.num_classes > 20 else "")
        raise GenforgeError(f"class: unknown class {text!r}; this model knows {shown} "
                            f"(or an index 0..{self.num_classes - 1})", param="class")

    def labels_for(self, label: str | int | None, n: int) -> list[int] | None:
        """One class for all n samples; without one, a conditional model takes its classes in turn."""
        k = self.resolve_class(label)
        if k is not None:
            return [k] * n
        return [i % self.num_classes for i in range(n)] if self.conditional else None


class DiffusionModel(ClassNamesMixin):
    """A trained UNet + its noise schedule + class names, and the one sampling loop."""

    family = "diffusion"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, class_names: list[str] | None = None):
        self.unet = unet.eval()
        self.scheduler = scheduler
        k = self.num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(k)]
        if len(self.class_names) != k:
            raise RunError(f"model has {k} classes but {len(self.class_names)} class names were given")

    @property
    def num_classes(self) -> int:
        n = self.unet.config.num_class_embeds
        return int(n) - 1 if n else 0

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.conditional else None

    @property
    def sample_size(self) -> int:
        s = self.unet.config.sample_size
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def device(self) -> torch.device:
        return self.unet.device  # diffusers' ModelMixin.device, or an onnxruntime UNet's (models/onnx_runtime.py)

    def check_request(self, *, labels: list[int] | None, guidance: float | None, steps: int | None,
                      sampler: str, n: int = 1) -> tuple[float, int]:
        """Validate sampling options; return (guidance, steps) with defaults filled in."""
        if n < 1:
            raise GenforgeError(f"n: {n} must be at least 1", param="n")
        if sampler not in SAMPLERS:
            raise GenforgeError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}", param="sampler")
        if labels is not None and not self.conditional:
            raise GenforgeError("class: this diffusion model is unconditional; leave out the class", param="class")
        for lab in labels or []:
            if not 0 <= lab < self.num_classes:
                raise GenforgeError(f"class: {lab} is out of range (0..{self.num_classes - 1})", param="class")
        if guidance is not None:
            if not self.conditional:
                raise GenforgeError("guidance: this diffusion model is unconditional, so it has no "
                                    "classifier-free guidance; leave guidance out", param="guidance")
            if not 0.0 <= guidance <= MAX_GUIDANCE:
                raise GenforgeError(f"guidance: {guidance} is out of range (0..{MAX_GUIDANCE:g}; 1 = plain "
                                    f"conditional, 3 is typical)", param="guidance")
        total = int(self.scheduler.config.num_train_timesteps)
        if steps is not None and not 1 <= steps <= total:
            raise GenforgeError(f"steps: {steps} is out of range (1..{total})", param="steps")
        default_steps = 50 if sampler == "ddim" else total
        return (1.0 if guidance is None else float(guidance)), min(steps or default_steps, total)

    @torch.no_grad()
    def sample(self, n: int, *, labels: list[int] | None = None, guidance: float | None = None,
               steps: int | None = None, sampler: str = "ddim", seed: int = 0, batch_size: int = 256,
               on_step=None) -> torch.Tensor:
        """`n` images in [-1, 1], shape (n, C, H, W), on the CPU.

        `labels`: one class per sample (None: unconditional, i.e. the null class). `guidance` g mixes
        eps = eps_null + g * (eps_class - eps_null); g = 1 is plain conditional sampling and costs
        one UNet pass per step, any other g two. DDIM (eta 0) is deterministic given the initial
        noise; DDPM also draws per-step noise, from the same per-sample generators.
        """
        if labels is not None and len(labels) != n:
            raise GenforgeError(f"labels: got {len(labels)} labels for {n} samples", param="class")
        guidance, steps = self.check_request(labels=labels, guidance=guidance, steps=steps, sampler=sampler, n=n)
        gens = sample_generators(seed, n)
        out = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            chunk_labels = None if labels is None else labels[lo:hi]
            out.append(self._sample_chunk(gens[lo:hi], chunk_labels, guidance, steps, sampler, on_step))
        return torch.cat(out).clamp(-1, 1)

    def _sample_chunk(self, gens: list[torch.Generator], labels: list[int] | None, guidance: float,
                      steps: int, sampler: str, on_step) -> torch.Tensor:
        device, n = self.device, len(gens)
        sched_cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        sched = sched_cls.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=device)
        shape = (self.channels, self.sample_size, self.sample_size)
        x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        x = x * sched.init_noise_sigma
        cond = uncond = None
        if self.conditional:
            uncond = torch.full((n,), self.null_class, dtype=torch.long, device=device)
            cond = uncond if labels is None else torch.tensor(labels, dtype=torch.long, device=device)
        # g = 1 or unconditional sampling needs only one pass; otherwise cond + null in one batch
        two_pass = labels is not None and guidance != 1.0
        # DDIM: re-derive eps from the clipped x0; otherwise a guided (amplified) eps carries the
        # overshoot that clipping removed into the next step, and samples saturate at g >= 3
        step_kwargs = {"eta": 0.0, "use_clipped_model_output": True} if sampler == "ddim" else {}
        for i, t in enumerate(sched.timesteps):
            if two_pass:
                both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, uncond])).sample
                eps_c, eps_u = both.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            else:
                eps = self.unet(x, t, class_labels=cond).sample
            x = sched.step(eps, t, x, generator=gens if sampler == "ddpm" else None, **step_kwargs).prev_sample
            if on_step is not None:
                on_step(i + 1, len(sched.timesteps))
        return x.float().cpu()

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write a DDPMPipeline folder plus genforge.json (class names) into `path`."""
        path = Path(path)
        DDPMPipeline(unet=self.unet, scheduler=self.scheduler).save_pretrained(path, safe_serialization=True)
        meta = {"family": "diffusion", "classes": self.class_names, "null_class": self.null_class,
                "sample_size": self.sample_size, "channels": self.channels,
                **(extra or {})}
        (path / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return path


def model_folder(path: str | Path) -> Path:
    """A run directory's model/ folder, or `path` itself if it is already a model folder."""
    path = Path(path)
    if (path / "model").is_dir() and not (path / "unet").is_dir():
        path = path / "model"
    return path


def load_diffusion(path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a diffusion model from a run directory or its model/ folder."""
    folder = model_folder(path)
    if not (folder / "unet" / "config.json").is_file():
        raise RunError(f"{path}: no diffusion model found (expected {folder}/unet/config.json); "
                       f"has the run finished training?")
    unet = UNet2DModel.from_pretrained(folder / "unet").to(device)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8")) if (folder / META_FILE).is_file() else {}
    return DiffusionModel(unet, scheduler, meta.get("classes"))
