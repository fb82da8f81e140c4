"""The latent-diffusion family: a UNet2DConditionModel learns to denoise VAE latents given a frozen
text encoder's states of the image's caption (Stable Diffusion's recipe, at digit scale).

How a run goes (`genforge train configs/latent-diffusion.yaml`):

1. The VAE is loaded or trained first. `model.vae: PATH` loads an AutoencoderKL (its folder, a
   pipeline folder holding vae/, or a latent-diffusion run). `model.vae: {settings}` trains one
   first, as a run of its own through the one loop (train/latent_vae.py) in RUN/vae/, with its own
   schedule, metrics, loss plot and checkpoints, exporting an AutoencoderKL folder: exactly what
   `model.vae: RUN/vae/model` would load, so "trained" and "loaded" end on one code path. Why a
   nested run rather than a phase switch inside one loop: the UNet and the VAE then each get a
   whole warmup + cosine schedule, EMA covers only the UNet (an EMA'd VAE would no longer be the
   VAE that encoded the latents), resume is exact per phase with no new loop code, and the VAE
   phase is reused when it is complete with the same settings (a resumed run never retrains it).
   train/loop.py is unchanged; jobs/train.py only maps the family name to this module.
   `train.time_budget` cuts only the UNet phase (size the VAE phase with model.vae.steps).
2. The dataset is encoded to latents once (the posterior mean and std of every image; each
   training step draws z = mean + std * eps, as SD's `latent_dist.sample()` does), and scaled by
   `scaling_factor` = 1 / std of the training latents, stored in the VAE's config so the
   pipeline decodes with it. Pixel augmentation would be lost, so `data.augment` is refused.
3. The text encoder is frozen, so every distinct caption (and "") is encoded once, up front, with
   the pipeline's own `encode_prompt` (padding to max_tokens, the same attention mask): what
   training sees is bit for bit what generation computes. Batches then look the states up.
4. Each step samples one caption per image uniformly from its `captions` (seeded by the batch
   index: exact resume), swaps it for "" with probability `caption_dropout` (classifier-free
   guidance, as the pipeline's unconditional branch uses ""), and regresses the noise (or v).
5. Export writes a StableDiffusionPipeline folder (models/latent_diffusion.py) with the EMA UNet
   when `train.ema_decay` is set, and a grid of samples for `model.sample_prompts` into
   samples/prompts.png and report.md.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genforge.common.config import Recipe, TrainConfig, from_dict, to_dict
from genforge.common.errors import ConfigError, DataError
from genforge.common.progress import console
from genforge.common.runs import RunDir, update_report
from genforge.data.captions import load_captions
from genforge.data.images import ImageBatches, ImageDataConfig, ImageDataset, save_image_grid
from genforge.models.latent_diffusion import (
    LatentDiffusionSpec,
    LearnedTokens,
    build_scheduler,
    build_unet,
    load_text_encoder,
    make_pipeline,
    save_pipeline,
    unknown_pieces,
    vae_factor,
)
from genforge.train.latent_vae import encode_latents, load_autoencoder, train_autoencoder
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw


def read_captions(ds: ImageDataset) -> list[list[str]]:
    """The training captions of every image, in images.npy order (contract 1's captions.jsonl)."""
    return [row["captions"] for row in load_captions(ds.path)]


class TextCache:
    """The frozen encoder's states of every distinct caption, computed once: `lookup(captions)`.
    Captions that use learned tokens (`live`) are not cached: their states change as the tokens learn."""

    def __init__(self, pipe, captions, chunk: int = 128, live: set[str] | frozenset = frozenset()):
        unique = sorted((set(captions) | {""}) - set(live))  # "" is the dropped / unconditional caption
        t0 = time.perf_counter()
        with torch.no_grad():
            states = [pipe.encode_prompt(unique[i:i + chunk], pipe.device, 1, False)[0].float().cpu()
                      for i in range(0, len(unique), chunk)]
        self.seconds = time.perf_counter() - t0
        self.states = torch.cat(states)  # U x max_tokens x hidden
        self.index = {c: i for i, c in enumerate(unique)}
        self.unknown_share = _unknown_token_share(pipe.tokenizer, unique)
        self.live = frozenset(live)

    def __len__(self) -> int:
        return len(self.index)

    def get(self, caption: str) -> torch.Tensor:
        return self.states[self.index[caption]]

    def lookup(self, captions: list[str]) -> torch.Tensor:
        return self.states[torch.tensor([self.index[c] for c in captions])]

    def freeze(self, encode, chunk: int = 128) -> None:
        """Cache the `live` captions too, with `encode(captions) -> states` (the learned rows as they
        now are): from here on every caption is a lookup."""
        live = sorted(self.live)
        with torch.no_grad():
            states = [encode(live[i:i + chunk]).float().cpu() for i in range(0, len(live), chunk)]
        self.index.update({c: len(self.index) + i for i, c in enumerate(live)})
        self.states = torch.cat([self.states, *states])
        self.live = frozenset()


def _unknown_token_share(tokenizer, captions: list[str]) -> float:
    """Share of caption tokens the encoder's vocabulary maps to its unknown token; warns when any."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0.0
    ids = tokenizer(captions, add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    bad = [c for c, x in zip(captions, ids) if unk in x]
    share = sum(x.count(unk) for x in ids) / max(total, 1)
    if bad:
        warnings.warn(f"{share:.1%} of caption tokens are unknown to the text encoder ({len(bad)} captions, e.g. "
                      f"{bad[0]!r}); those words cannot steer the model: use an encoder whose vocabulary covers "
                      "the captions' language", stacklevel=3)
    return share


def _unknown_note(tokenizer, prompt: str) -> str:
    """" (3 of 6 tokens unknown to the text encoder)" for a prompt the encoder cannot fully read."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bad = ids.count(tokenizer.unk_token_id) if tokenizer.unk_token_id is not None else 0
    return f" ({bad} of {len(ids)} tokens unknown to the text encoder)" if bad else ""


class CaptionedLatents:
    """The loop's DataSource: batch i holds latent posteriors and one caption per image, both a pure
    function of i (the image order is ImageBatches' seeded epochs)."""

    tokens_per_batch = None

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor, list[list[str]]],
                 val: tuple[torch.Tensor, torch.Tensor, list[list[str]]], batch_size: int, seed: int,
                 val_batch_size: int | None = None):
        self.mean, self.std, self.captions = train
        self.val, self.seed = val, seed
        self.order = ImageBatches(self.mean, torch.arange(len(self.mean)), batch_size, seed)
        self.val_batch_size = val_batch_size or batch_size

    def train_batch(self, index: int) -> dict:
        idx = self.order.indices(index).tolist()
        # an int tuple hashes the same in every process (only str/bytes hashing is salted)
        g = torch.Generator().manual_seed(hash((self.seed, index, 2)) & (2**63 - 1))
        picks = torch.randint(0, 2**31, (len(idx),), generator=g).tolist()
        caps = [self.captions[i][p % len(self.captions[i])] for i, p in zip(idx, picks)]
        return {"mean": self.mean[idx], "std": self.std[idx], "captions": caps, "index": index}

    def val_batches(self, n: int) -> list[dict]:
        mean, std, caps = self.val
        b = self.val_batch_size
        return [{"mean": mean[i:i + b], "std": std[i:i + b], "captions": [c[0] for c in caps[i:i + b]]}
                for i in range(0, min(len(mean), n * b), b)]


class LatentDiffusionObjective(SingleLoss):
    def __init__(self, spec: LatentDiffusionSpec, parts: dict, cache: TextCache, device: torch.device,
                 run: RunDir, meta: dict, figures: dict, learned: LearnedTokens | None = None,
                 freeze_at_batch: int | None = None):
        self.spec, self.cache, self.device, self.run, self.meta, self.figures = spec, cache, device, run, meta, figures
        self.unet = parts["unet"].to(device)
        self.vae, self.text_encoder, self.tokenizer = parts["vae"], parts["text_encoder"], parts["tokenizer"]
        self.scheduler = parts["scheduler"]
        self.learned, self.freeze_at_batch = learned, freeze_at_batch
        self.modules = {"unet": self.unet, **({"learned_tokens": learned.to(device)} if learned else {})}
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.T = int(self.scheduler.config.num_train_timesteps)
        self.scaling = float(self.vae.config.scaling_factor)

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        if self.learned is None:
            return [OptimizerSpec(adamw(self.unet.parameters(), cfg, device=self.device))]
        unet = list(self.unet.parameters())
        groups = [{"params": [p for p in unet if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in unet if p.dim() < 2], "weight_decay": 0.0},
                  {"params": list(self.learned.parameters()), "weight_decay": 0.0,
                   "lr_scale": self.spec.learned_tokens_lr_scale}]
        return [OptimizerSpec(adamw(groups, cfg, device=self.device))]

    def _states(self, captions: list[str], dev: torch.device) -> torch.Tensor:
        """The text states of `captions`: cached, or (captions with learned tokens) encoded now, with
        gradients into the learned rows while training."""
        live = [i for i, c in enumerate(captions) if c in self.cache.live]
        if not live:
            return self.cache.lookup(captions).to(dev)
        out = self.cache.lookup([c if c not in self.cache.live else "" for c in captions]).to(dev)
        states = self._encode_learned([captions[i] for i in live], dev)
        index = torch.tensor(live, device=dev)
        return out.index_copy(0, index, states.to(out.dtype))

    def _encode_learned(self, captions: list[str], dev: torch.device) -> torch.Tensor:
        tok = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.learned.encode(self.text_encoder, tok.input_ids.to(dev), tok.attention_mask.to(dev))

    def _maybe_freeze(self, index: int) -> None:
        """Past `learned_tokens_steps`, the learned rows stop training and their captions join the cache:
        the encoder's forward and backward were most of a step's cost (0.17 of 0.29 s on 2 cores). A
        resumed run freezes on its first batch, with the rows its checkpoint restored."""
        if self.freeze_at_batch is None or index < self.freeze_at_batch or not self.cache.live:
            return
        self.learned.rows.requires_grad_(False)  # AdamW skips a parameter without a gradient
        self.cache.freeze(lambda caps: self._encode_learned(caps, self.device))
        console.print(f"learned tokens frozen after {self.spec.learned_tokens_steps} steps; their captions are cached")

    def _loss(self, batch: dict, gen: torch.Generator | None = None, dropout: float = 0.0) -> torch.Tensor:
        mean, dev = batch["mean"], batch["mean"].device
        n = mean.shape[0]
        # drawn on the CPU: the global RNG (restored on resume) or eval's fixed generator, on any device
        z = (mean + batch["std"] * torch.randn(mean.shape, generator=gen).to(dev)) * self.scaling
        noise = torch.randn(mean.shape, generator=gen).to(dev)
        t = torch.randint(0, self.T, (n,), generator=gen).to(dev)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        captions = batch["captions"]
        if dropout > 0:
            drop = (torch.rand(n, generator=gen) < dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        cond = self._states(captions, dev)
        pred = self.unet(zt, t, encoder_hidden_states=cond).sample
        target = noise if self.spec.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
        return F.mse_loss(pred.float(), target.float())

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        if "index" in batch:
            self._maybe_freeze(int(batch["index"]))
        loss = self._loss(batch, dropout=self.spec.caption_dropout)
        return loss, {"loss": loss.detach()}

    def eval_step(self, batch: dict) -> dict[str, float]:
        # fixed noise, timesteps and captions: val_loss moves only when the model does
        return {"loss": float(self._loss(batch, torch.Generator().manual_seed(0)))}

    def parallel_modules(self) -> dict[str, torch.nn.Module]:
        if self.learned is not None:
            raise ConfigError("train: latent-diffusion's learned caption tokens train outside the UNet's forward, "
                              "which DDP, FSDP and activation checkpointing work through; train this recipe on "
                              "one process, without train.activation_checkpointing")
        return {"unet": self.unet}

    def signature(self) -> dict:
        vae = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
        return {**to_dict(self.spec), "vae_config": json.loads(json.dumps(vae))}

    def pipeline(self):
        return make_pipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                             unet=self.unet, scheduler=self.scheduler)

    def export(self, model_dir: Path) -> None:
        if self.learned is not None:  # the learned rows into the encoder's own table: a plain pipeline reads them
            self.learned.write_into(self.text_encoder)
        pipe = self.pipeline()
        save_pipeline(pipe, model_dir, self.meta)
        self.unet.eval()
        try:
            self._sample_report(pipe)
        finally:
            self.unet.train()

    @torch.no_grad()
    def _sample_report(self, pipe, per_prompt: int = 8) -> None:
        """A grid (one row per sample prompt, seed 0) into samples/prompts.png and report.md."""
        s = self.spec
        rows = [pipe(p, num_images_per_prompt=per_prompt, guidance_scale=s.sample_guidance,
                     num_inference_steps=s.sample_steps, generator=torch.Generator().manual_seed(0),
                     output_type="pt").images for p in s.sample_prompts]
        grid = save_image_grid(torch.cat(rows) * 2 - 1, self.run.samples_dir / "prompts.png", nrow=per_prompt,
                               scale=3)
        f = self.figures
        prompts = "\n".join(f"{i + 1}. {p}{_unknown_note(self.tokenizer, p)}" for i, p in enumerate(s.sample_prompts))
        update_report(self.run, "text-to-image", (
            f"## Text-to-image samples\n\nOne row per prompt, guidance {s.sample_guidance:g}, "
            f"{s.sample_steps} DDIM steps, seed 0 (`StableDiffusionPipeline` from `model/`):\n\n{prompts}\n\n"
            f"![samples]({grid.relative_to(self.run.path).as_posix()})\n\n"
            f"Encoded once: {f['captions']} distinct captions in {f['text_s']:.1f} s (encoding each batch's "
            f"captions would cost {f['text_batch_ms']:.0f} ms a step); {f['images']} images to latents in "
            f"{f['latent_s']:.1f} s (encoding each batch would cost {f['vae_batch_ms']:.0f} ms a step). "
            f"VAE: {f['vae_source']}; latent scaling factor {self.scaling:.4f}.\n"))

    def describe(self) -> dict:
        f = self.figures
        return {"parameters": sum(p.numel() for p in self.unet.parameters()),
                "architecture": f"UNet2DConditionModel on {f['latent_shape']} latents, cross-attention to "
                                f"{f['text_encoder']} ({self.text_encoder.config.hidden_size}-d, frozen)",
                "VAE": f"{f['vae_source']}, scaling factor {self.scaling:.4f}",
                "text cache": f"{f['captions']} captions in {f['text_s']:.1f} s ({self.cache.states.numel() * 4 / 2**20:.0f} MiB); "
                              f"per-step encoding would cost {f['text_batch_ms']:.0f} ms",
                "latent cache": f"{f['images']} images in {f['latent_s']:.1f} s; per-step encoding would cost "
                                f"{f['vae_batch_ms']:.0f} ms"}


def _split_rows(ds: ImageDataset, exclude: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into images.npy, hence captions.jsonl) of the train and val splits."""
    split = np.load(ds.path / "split.npy")
    keep = ~np.isin(ds.labels.numpy(), exclude)
    return np.flatnonzero((split == 0) & keep), np.flatnonzero((split == 1) & keep)


def _ms(fn, *args) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return (time.perf_counter() - t0) * 1000


def build(recipe: Recipe, device: torch.device) -> tuple[LatentDiffusionObjective, CaptionedLatents]:
    spec = from_dict(LatentDiffusionSpec, recipe.model, "model")
    vae_spec = spec.vae_settings()
    data_cfg = from_dict(ImageDataConfig, recipe.data, "data")
    if data_cfg.augment.enabled:
        raise ConfigError("data.augment: latent diffusion encodes the dataset to latents once, so pixel "
                          "augmentation would be lost; remove data.augment")
    ds = ImageDataset(recipe.dataset)
    if not isinstance(ds.size, int):
        raise ConfigError(f"dataset {recipe.dataset}: images are {ds.size}, latent diffusion needs square ones "
                          "(prepare with --size N)")
    captions = read_captions(ds)
    exclude = [ds.class_index(c) for c in data_cfg.exclude_classes]
    train_rows, val_rows = _split_rows(ds, exclude)
    if len(train_rows) == 0:
        raise DataError(f"{ds.path}: no training images (is every class excluded?)")
    text_encoder, tokenizer = load_text_encoder(spec.text_encoder, spec.max_tokens)
    text_encoder.to(device)
    run, cfg = RunDir(recipe.run_dir), recipe.train

    if vae_spec is not None:
        vae = train_autoencoder(vae_spec, ds, train_rows, val_rows, recipe, device, RunDir(run.path / "vae"))
        vae_source = f"trained first in {run.path / 'vae'} ({vae_spec.steps} steps)"
    else:
        vae = load_autoencoder(spec.vae, ds, device)
        vae_source = f"loaded from {spec.vae}"
    vae.eval().requires_grad_(False)

    t0 = time.perf_counter()
    mean, std = encode_latents(vae, ds.images, device)
    latent_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(cfg.seed)
    sample = mean[train_rows] + std[train_rows] * torch.randn(mean[train_rows].shape, generator=g)
    vae.register_to_config(scaling_factor=float(1.0 / sample.std()))

    scheduler = build_scheduler(spec)
    torch.manual_seed(cfg.seed)
    unet = build_unet(spec, latent_channels=mean.shape[1], latent_size=mean.shape[-1],
                      cross_attention_dim=text_encoder.config.hidden_size)
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    train_caps = [c for i in train_rows.tolist() for c in captions[i]]
    val_caps = [captions[i][0] for i in val_rows.tolist()]
    learned, live = None, set()
    pieces = unknown_pieces(tokenizer, train_caps) if spec.learn_unknown_tokens else []
    if pieces:
        learned = LearnedTokens(text_encoder, tokenizer, pieces, seed=cfg.seed)
        unique = sorted(set(train_caps) | set(val_caps))
        uses = learned.uses(tokenizer(unique, padding="max_length", max_length=spec.max_tokens, truncation=True,
                                      return_tensors="pt").input_ids)
        live = {c for c, u in zip(unique, uses.tolist()) if u}
        console.print(f"learned tokens: {len(pieces)} words the text encoder read as unknown ({''.join(pieces[:20])}"
                      f"{' ...' if len(pieces) > 20 else ''}) get trained embeddings; {len(live)} captions use them")
    pipe = make_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    cache = TextCache(pipe, train_caps + val_caps, live=live)
    console.print(f"text cache: {len(cache)} distinct captions encoded in {cache.seconds:.1f}s; "
                  f"latents: {len(mean)} images encoded in {latent_s:.1f}s")

    b = cfg.batch_size
    batch_caps = [captions[i][0] for i in train_rows[:b].tolist()]
    figures = {"captions": len(cache), "text_s": cache.seconds, "images": len(mean), "latent_s": latent_s,
               "text_batch_ms": _ms(pipe.encode_prompt, batch_caps, device, 1, False),
               "vae_batch_ms": _ms(vae.encode, ds.images[train_rows[:b]].to(device)),
               "latent_shape": "x".join(map(str, mean.shape[1:])), "vae_source": vae_source,
               "text_encoder": Path(spec.text_encoder).name if spec.text_encoder else "all-MiniLM-L6-v2"}
    data = CaptionedLatents((mean[train_rows], std[train_rows], [captions[i] for i in train_rows.tolist()]),
                            (mean[val_rows], std[val_rows], [captions[i] for i in val_rows.tolist()]),
                            b, cfg.seed, data_cfg.val_batch_size)
    meta = {"image_size": ds.size, "channels": ds.channels, "classes": ds.classes,
            "latent_shape": list(mean.shape[1:]), "vae_factor": vae_factor(vae),
            "dataset": {"path": str(ds.path.resolve()), "content_hash": ds.content_hash},
            "text_encoder": {"source": str(Path(spec.text_encoder).resolve()) if spec.text_encoder else
                             str(_default_source()), "max_tokens": spec.max_tokens},
            "vae_scaling_factor": float(vae.config.scaling_factor), "vae": vae_source,
            "caption_dropout": spec.caption_dropout}
    meta["learned_tokens"] = pieces
    freeze = spec.learned_tokens_steps * cfg.grad_accum if learned is not None and spec.learned_tokens_steps else None
    return LatentDiffusionObjective(spec, parts, cache, device, run, meta, figures, learned, freeze), data


def _default_source() -> Path:
    from genforge.models.latent_diffusion import default_text_encoder_path

    return default_text_encoder_path()
