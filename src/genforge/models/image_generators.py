"""The generator of any image run (diffusion, VAE, GAN) behind one `sample` call.

`load_image_generator(run)` reads the family from the model folder's genforge.json and returns
a `DiffusionModel` or a `LatentGenerator` (a VAE decoder or GAN generator), so eval, jobs and the
images endpoint sample every image family the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genforge.common.errors import GenforgeError, RunError
from genforge.models.diffusion import META_FILE, ClassNamesMixin, DiffusionModel, load_diffusion, model_folder
from genforge.models.gan import load_generator
from genforge.models.vae import load_vae


class LatentGenerator(ClassNamesMixin):
    """A VAE decoder or GAN generator behind the same `sample` call as DiffusionModel.

    They map noise to an image in one pass, so `guidance`, `steps` and the `ddpm` sampler are
    refused with a message rather than ignored.
    """

    def __init__(self, family: str, module: torch.nn.Module, meta: dict):
        self.family, self.module, self.meta = family, module, meta
        cfg = module.config
        self._num_classes = int(getattr(cfg, "num_classes", 0) or 0)
        names = meta.get("classes") or []
        self.class_names = list(names) if len(names) == self._num_classes else [str(i) for i in range(self._num_classes)]
        self.sample_size, self.channels = int(cfg.sample_size), int(cfg.channels)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def check_request(self, *, labels: list[int] | None, guidance: float | None, steps: int | None,
                      sampler: str, n: int = 1) -> tuple[float, int]:
        if n < 1:
            raise GenforgeError(f"n: {n} must be at least 1", param="n")
        for name, value in (("guidance", guidance), ("steps", steps)):
            if value is not None:
                raise GenforgeError(f"{name}: a {self.family} generates in one pass; only diffusion runs "
                                    f"take {name}", param=name)
        if sampler not in (None, "ddim"):  # "ddim" is the CLI's default, so it cannot mean a request
            raise GenforgeError(f"sampler: a {self.family} has no sampler; only diffusion runs take "
                                f"ddim/ddpm", param="sampler")
        if labels is not None and not self.conditional:
            raise GenforgeError(f"class: this {self.family} model is unconditional; leave out the class",
                                param="class")
        for lab in labels or []:
            if not 0 <= lab < self.num_classes:
                raise GenforgeError(f"class: {lab} is out of range (0..{self.num_classes - 1})", param="class")
        return 1.0, 1

    @torch.no_grad()
    def sample(self, n: int, *, labels: list[int] | None = None, guidance: float | None = None,
               steps: int | None = None, sampler: str | None = None, seed: int = 0, batch_size: int = 512,
               on_step=None) -> torch.Tensor:
        self.check_request(labels=labels, guidance=guidance, steps=steps, sampler=sampler, n=n)
        if self.family == "vae":
            out = self.module.sample(n, seed=seed)
        else:
            lab = None if labels is None else torch.tensor(labels, dtype=torch.long)
            out = self.module.sample(n, seed=seed, labels=lab)
        return out.float().cpu().clamp(-1, 1)


def load_image_generator(path: str | Path, device: str | torch.device = "cpu") -> DiffusionModel | LatentGenerator:
    """The generator of any image run (diffusion, vae, gan), from the run or its model/ folder."""
    folder = model_folder(path)
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8")) if (folder / META_FILE).is_file() else {}
    family = meta.get("family") or ("diffusion" if (folder / "unet").is_dir() else None)
    if family == "diffusion":
        return load_diffusion(folder, device)
    if family == "vae":
        vae, meta = load_vae(folder, device)
        return LatentGenerator("vae", vae, meta)
    if family == "gan":
        gen, meta = load_generator(folder, device)
        return LatentGenerator("gan", gen, meta)
    raise RunError(f"{path}: not an image run with a trained model (found family {family!r}; "
                   f"image generation needs a diffusion, vae or gan run that finished training)")
