"""The GAN family: DCGAN (non-saturating BCE) or WGAN-GP, through the loop's MultiStep path.

One loop step = one generator update. DCGAN: one discriminator step, then one generator step.
WGAN-GP: `n_critic` critic steps (Wasserstein loss + gradient penalty, lambda = 10), each on its
own slice of real images, then one generator step; so the DataSource's batch holds
batch_size * n_critic images and the data position stays one integer (exact resume).
Optimizers are Adam with the literature's betas: (0.5, 0.999) for DCGAN (Radford et al.),
(0.0, 0.9) for WGAN-GP (Gulrajani et al.); `model.betas` overrides them.

Validation "loss" is the pixel-space kernel MMD^2 between samples from a fixed noise batch and
the val images: unlike the adversarial losses, which only say how the two players compare, it
falls as samples get closer to the data, so the loop's "best" checkpoint means something.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.common.config import Recipe, Spec, TrainConfig, from_dict, rng
from genforge.common.errors import ConfigError
from genforge.data.images import ImageBatches, ImageDataset, load_image_data
from genforge.models.gan import NORMS, Discriminator, Generator
from genforge.models.vae import save_meta
from genforge.train.objective import MultiStep, OptimizerSpec, Stepper, adamw

LOSSES = ("dcgan", "wgan-gp")
_BETAS = {"dcgan": (0.5, 0.999), "wgan-gp": (0.0, 0.9)}


class GANSpec(Spec):
    """The recipe's `model:` section for family gan."""

    loss: str = rng("dcgan", choices=list(LOSSES))
    latent_dim: int = rng(64, min=1, max=1024)
    g_channels: int = rng(32, min=1, help="generator width at the image resolution")
    d_channels: int = rng(32, min=1, help="discriminator width at the image resolution")
    norm: str | None = rng(None, choices=[*NORMS, None], help="discriminator norm; default batch (dcgan), "
                           "layer (wgan-gp)")
    conditional: bool = True  # class-conditional G + projection D when the dataset has >1 class
    n_critic: int = rng(5, min=1, max=20, help="wgan-gp: critic steps per generator step")
    gp_lambda: float = rng(10.0, min=0)
    d_lr_scale: float = rng(1.0, min=0, min_exclusive=True, help="discriminator lr = train.lr * this")
    betas: tuple[float, float] | None = None  # Adam betas; default by loss (see module docstring)

    def check(self) -> None:
        if self.loss == "wgan-gp" and self.norm == "batch":
            raise ConfigError("model.norm: batch norm breaks the WGAN-GP gradient penalty (it is per "
                              "sample); use layer or none")
        if self.betas is not None and not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"model.betas: {list(self.betas)} must be in [0, 1)")


def mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD^2 with an RBF kernel whose bandwidth is the median distance between `y` (real)
    images, so it is fixed by the val data and comparable across evals."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    dyy = torch.cdist(y, y).pow(2)
    bw = dyy[dyy > 0].median() if (dyy > 0).any() else torch.tensor(1.0)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / bw)

    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


class GANObjective(MultiStep):
    def __init__(self, g: Generator, d: Discriminator, spec: GANSpec, dataset: ImageDataset, exclude: list[str],
                 batch_size: int, device: torch.device, seed: int):
        self.g, self.d, self.spec, self.dataset, self.exclude = g, d, spec, dataset, exclude
        self.batch_size, self.device = batch_size, device
        self.modules = {"generator": g, "discriminator": d}
        self.conditional = g.config.num_classes > 0
        # fixed noise (and labels) for eval: the same z every eval, so val metrics track the generator
        gen = torch.Generator().manual_seed(seed + 1)
        self.fixed_z = torch.randn(max(batch_size, 256), g.config.latent_dim, generator=gen).to(device)

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        betas = tuple(self.spec.betas or _BETAS[self.spec.loss])
        return [OptimizerSpec(adamw(self.g.parameters(), cfg, device=self.device, betas=betas)),
                OptimizerSpec(adamw(self.d.parameters(), cfg, device=self.device, betas=betas),
                              lr_scale=self.spec.d_lr_scale)]

    def _labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        return labels if self.conditional else None

    def step(self, batch: dict, stepper: Stepper) -> dict[str, float]:
        images, labels = batch["images"], batch["labels"]
        n_d = self.spec.n_critic if self.spec.loss == "wgan-gp" else 1
        chunks = list(zip(images.chunk(n_d), labels.chunk(n_d)))
        row: dict[str, float] = {}
        self.d.requires_grad_(True)
        for real, y in chunks:
            with stepper.autocast():
                with torch.no_grad():
                    fake = self.g(self.g.noise(len(real)), self._labels(y))
                d_real, d_fake = self.d(real, self._labels(y)), self.d(fake, self._labels(y))
                if self.spec.loss == "dcgan":
                    loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
                else:
                    w = d_real.mean() - d_fake.mean()
            if self.spec.loss == "wgan-gp":
                gp = self._gradient_penalty(real, fake, y, stepper)
                loss_d = -w + self.spec.gp_lambda * gp
                row["w_dist"], row["gp"] = float(w.detach()), float(gp.detach())
            stepper.update(1, loss_d)  # backward outside autocast
        row["loss_d"] = float(loss_d.detach())
        # generator step: D's parameters are frozen so no stale gradients reach its next step
        self.d.requires_grad_(False)
        real, y = chunks[-1]
        with stepper.autocast():
            score = self.d(self.g(self.g.noise(len(real)), self._labels(y)), self._labels(y))
            loss_g = F.softplus(-score).mean() if self.spec.loss == "dcgan" else -score.mean()
        stepper.update(0, loss_g)
        self.d.requires_grad_(True)
        row["loss_g"] = float(loss_g.detach())
        if self.spec.loss == "dcgan":
            row["d_real"] = float(torch.sigmoid(d_real.detach()).mean())
            row["d_fake"] = float(torch.sigmoid(d_fake.detach()).mean())
        return row

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor,
                          stepper: Stepper) -> torch.Tensor:
        eps = torch.rand(len(real), 1, 1, 1, device=real.device, dtype=real.dtype)
        mix = (eps * real + (1 - eps) * fake.to(real.dtype)).requires_grad_(True)
        with stepper.autocast():
            score = self.d(mix, self._labels(y)).sum()
        (grad,) = stepper.grad(score, mix)  # a backward pass too: outside autocast, loss-scaled under fp16
        return (grad.float().flatten(1).norm(dim=1) - 1).pow(2).mean()

    def eval_step(self, batch: dict) -> dict[str, float]:
        real, y = batch["images"], batch["labels"]
        n = len(real)
        # labels of the val batch condition the fixed noise: the same class mix as the real images
        fake = self.g(self.fixed_z[:n], self._labels(y))
        d_real, d_fake = self.d(real, self._labels(y)), self.d(fake, self._labels(y))
        out = {"loss": float(mmd2(fake, real))}
        if self.spec.loss == "dcgan":
            out["loss_g"] = float(F.softplus(-d_fake).mean())
            out["loss_d"] = float(F.softplus(-d_real).mean() + F.softplus(d_fake).mean())
        else:
            out["loss_g"] = float(-d_fake.mean())
            out["w_dist"] = float(d_real.mean() - d_fake.mean())
        return out

    def signature(self) -> dict:
        clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        return {"generator": clean(self.g.config), "discriminator": clean(self.d.config),
                "loss": self.spec.loss, "n_critic": self.spec.n_critic}

    def export(self, model_dir: Path) -> None:
        self.g.save_pretrained(Path(model_dir) / "generator")
        self.d.save_pretrained(Path(model_dir) / "discriminator")
        save_meta(model_dir, {
            "family": "gan", "loss": self.spec.loss, "classes": self.dataset.classes,
            "conditional": self.conditional, "sample_size": self.g.config.sample_size,
            "channels": self.g.config.channels, "latent_dim": self.g.config.latent_dim,
            "exclude_classes": self.exclude,
            "dataset": {"path": str(self.dataset.path.resolve()), "content_hash": self.dataset.content_hash}})

    def describe(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"parameters (generator)": count(self.g), "parameters (discriminator)": count(self.d),
                "architecture": f"{self.spec.loss} {'class-conditional' if self.conditional else 'unconditional'}"
                                f" GAN, latent {self.g.config.latent_dim}"}


def build(recipe: Recipe, device: torch.device) -> tuple[GANObjective, ImageBatches]:
    spec = from_dict(GANSpec, recipe.model, "model")
    cfg = recipe.train
    if cfg.grad_accum != 1:
        raise ConfigError("train.grad_accum: the GAN alternates optimizers every step and cannot "
                          f"accumulate gradients; set it to 1 (got {cfg.grad_accum}) and raise batch_size")
    if recipe.lora is not None:
        raise ConfigError("lora: LoRA is supported for the vae family, not gan; remove the section")
    n_d = spec.n_critic if spec.loss == "wgan-gp" else 1
    data_tree = {"val_batch_size": cfg.batch_size, **(recipe.data or {})}
    dataset, data, data_cfg = load_image_data(recipe.dataset, data_tree, cfg.batch_size * n_d, cfg.seed)
    if not isinstance(dataset.size, int):
        raise ConfigError(f"dataset {recipe.dataset}: images are {dataset.size}, the GAN needs square ones")
    num_classes = dataset.num_classes if spec.conditional and dataset.num_classes > 1 else 0
    norm = spec.norm or ("batch" if spec.loss == "dcgan" else "layer")
    torch.manual_seed(cfg.seed)
    g = Generator(sample_size=dataset.size, channels=dataset.channels, latent_dim=spec.latent_dim,
                  base_channels=spec.g_channels, num_classes=num_classes).to(device)
    d = Discriminator(sample_size=dataset.size, channels=dataset.channels, base_channels=spec.d_channels,
                      norm=norm, num_classes=num_classes).to(device)
    exclude = [dataset.classes[dataset.class_index(c)] for c in data_cfg.exclude_classes]
    return GANObjective(g, d, spec, dataset, exclude, cfg.batch_size, device, cfg.seed), data
