"""The VAE phase of latent diffusion: an AutoencoderKL trained through the one loop, or loaded.

`train_autoencoder` runs the loop on an `AutoencoderObjective` into a nested run (RUN/vae/): loss =
per-pixel squared error + kl_weight * KL per pixel (Stable Diffusion adds a perceptual and a GAN term;
at 32px digits the squared error suffices). A complete VAE phase with the same settings and data is
reused; an interrupted one resumes from its checkpoint; a different one starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genforge.common.config import Recipe, TrainConfig, to_dict
from genforge.common.errors import ConfigError
from genforge.common.progress import console
from genforge.common.runs import RunDir
from genforge.data.images import ImageBatches, ImageDataset
from genforge.models.latent_diffusion import META_FILE, AutoencoderSpec, build_autoencoder, vae_factor
from genforge.train import checkpoint
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw


class AutoencoderObjective(SingleLoss):
    def __init__(self, vae, spec: AutoencoderSpec, device: torch.device, meta: dict):
        self.vae, self.spec, self.device, self.meta = vae.to(device), spec, device, meta
        self.modules = {"vae": self.vae}

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        return [OptimizerSpec(adamw(self.vae.parameters(), cfg, device=self.device))]

    def _terms(self, x: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(x.device)
        recon = F.mse_loss(self.vae.decode(z).sample.float(), x.float())
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, like the squared error
        return recon, kl

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        recon, kl = self._terms(batch["images"])
        loss = recon + self.spec.kl_weight * kl
        return loss, {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    def eval_step(self, batch: dict) -> dict[str, float]:
        recon, kl = self._terms(batch["images"], torch.Generator().manual_seed(0))
        return {"loss": float(recon + self.spec.kl_weight * kl), "recon": float(recon), "kl": float(kl)}

    def signature(self) -> dict:
        return json.loads(json.dumps({**to_dict(self.spec), "dataset": self.meta["dataset"]}))

    def export(self, model_dir: Path) -> None:
        self.vae.save_pretrained(model_dir)
        (model_dir / META_FILE).write_text(json.dumps({**self.meta, "signature": self.signature()}, indent=2),
                                           encoding="utf-8")


def _phase_config(spec: AutoencoderSpec, cfg: TrainConfig) -> TrainConfig:
    """The UNet's loop settings with the VAE's steps, lr and batch; no EMA, no time budget."""
    return TrainConfig(**{**to_dict(cfg), "max_steps": spec.steps, "max_tokens": None, "lr": spec.lr,
                          "min_lr": None, "batch_size": spec.batch_size or cfg.batch_size, "ema_decay": None,
                          "time_budget": None, "warmup_steps": min(cfg.warmup_steps, spec.steps // 10),
                          "eval_every": min(cfg.eval_every, spec.steps),
                          "checkpoint_every": min(cfg.checkpoint_every, spec.steps)})


def train_autoencoder(spec: AutoencoderSpec, ds: ImageDataset, train_rows: np.ndarray, val_rows: np.ndarray,
                      recipe: Recipe, device: torch.device, run: RunDir):
    """Train (or reuse, or resume) the VAE phase in `run`; the trained AutoencoderKL."""
    from diffusers import AutoencoderKL

    from genforge.train.loop import train

    cfg = _phase_config(spec, recipe.train)
    torch.manual_seed(recipe.train.seed)
    vae = build_autoencoder(spec, channels=ds.channels, sample_size=ds.size)
    meta = {"family": "autoencoder-kl", "steps": spec.steps,
            "dataset": {"path": str(ds.path.resolve()), "content_hash": ds.content_hash}}
    objective = AutoencoderObjective(vae, spec, device, meta)
    sig = objective.signature()
    done = run.model_dir / META_FILE
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("signature") == sig:
        console.print(f"VAE phase: reusing the trained VAE in {run.model_dir}")
        return AutoencoderKL.from_pretrained(run.model_dir).to(device)
    latest = run.latest_checkpoint()
    resume = latest is not None and checkpoint.read_meta(latest).get("signature") == sig
    if not resume and run.path.exists():
        shutil.rmtree(run.path)  # another VAE's phase: this run's VAE starts over
    run.create()
    images = ds.images
    data = ImageBatches(images[train_rows], torch.zeros(len(train_rows)), cfg.batch_size, cfg.seed,
                        val=(images[val_rows], torch.zeros(len(val_rows))))
    console.print(f"VAE phase: {spec.steps} steps into {run.path}" + (" (resumed)" if resume else ""))
    train(objective, data, cfg, run, device=device, resume=resume)
    return objective.vae


def load_autoencoder(path: str, ds: ImageDataset, device: torch.device):
    """An AutoencoderKL from its folder, a pipeline folder holding vae/, or a run (RUN/model/vae, RUN/vae/model)."""
    from diffusers import AutoencoderKL

    root = Path(path)
    for folder in (root, root / "vae", root / "model" / "vae", root / "vae" / "model"):
        config = folder / "config.json"
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderKL":
            break
    else:
        raise ConfigError(f"model.vae: no AutoencoderKL found at {path} (looked for config.json there, in vae/, "
                          "model/vae/ and vae/model/); give a VAE folder or run, or VAE settings to train one",
                          param="model.vae")
    vae = AutoencoderKL.from_pretrained(folder).to(device)
    if vae.config.in_channels != ds.channels:
        raise ConfigError(f"model.vae: {folder} takes {vae.config.in_channels}-channel images, the dataset has "
                          f"{ds.channels}", param="model.vae")
    if ds.size % vae_factor(vae):
        raise ConfigError(f"model.vae: {folder} shrinks images {vae_factor(vae)}x, which does not divide the "
                          f"dataset's {ds.size}px", param="model.vae")
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: torch.device, batch: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior mean, posterior std) of every image, on the CPU: the dataset's latents, encoded once."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch].to(device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)
