"""The diffusion family: epsilon (or v / x0) prediction with MSE at a uniformly drawn timestep.

Labels are swapped to the null class with probability `model.cond_dropout`, so one UNet learns
both p(x | class) and p(x), which is what classifier-free guidance mixes at sampling time.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.common.config import Recipe, TrainConfig, from_dict, to_dict
from genforge.data.images import ImageBatches, load_image_data
from genforge.models.diffusion import DiffusionModel, DiffusionSpec, build_scheduler, build_unet
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw


class DiffusionObjective(SingleLoss):
    def __init__(self, model: DiffusionModel, spec: DiffusionSpec, device: torch.device, meta: dict | None = None):
        self.model = model
        self.unet = model.unet.to(device)
        self.spec = spec
        self.device = device
        self.meta = meta or {}
        self.modules = {"unet": self.unet}
        sched = model.scheduler
        self.alphas_cumprod = sched.alphas_cumprod.to(device)
        self.T = int(sched.config.num_train_timesteps)

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        return [OptimizerSpec(adamw(self.unet.parameters(), cfg, device=self.device))]

    def _loss(self, batch: dict, gen: torch.Generator | None = None) -> torch.Tensor:
        x0, labels = batch["images"], batch["labels"]
        n = x0.shape[0]
        dev = x0.device
        # draw on the CPU so a generator (eval) and the global RNG (training; restored on resume)
        # give the same numbers on any device
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, self.T, (n,), generator=gen).to(dev)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = None
        if self.model.conditional:
            drop = torch.rand(n, generator=gen).to(dev) < self.spec.cond_dropout
            cond = torch.where(drop, torch.full_like(labels, self.model.null_class), labels)
        pred = self.unet(xt, t, class_labels=cond).sample
        if self.spec.prediction_type == "epsilon":
            target = noise
        elif self.spec.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * x0
        else:
            target = x0
        return F.mse_loss(pred.float(), target.float())

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self._loss(batch)
        return loss, {"loss": loss.detach()}

    def eval_step(self, batch: dict) -> dict[str, float]:
        # fixed noise and timesteps, so val_loss moves only when the model does
        return {"loss": float(self._loss(batch, torch.Generator().manual_seed(0)))}

    def signature(self) -> dict:
        return to_dict(self.spec)

    def export(self, model_dir: Path) -> None:
        self.model.save(model_dir, extra=self.meta)

    def describe(self) -> dict:
        return {"parameters": sum(p.numel() for p in self.unet.parameters()), "architecture": "UNet2DModel",
                "conditional": self.model.conditional}


def build(recipe: Recipe, device: torch.device) -> tuple[DiffusionObjective, ImageBatches]:
    ds, data, _ = load_image_data(recipe.dataset, recipe.data, recipe.train.batch_size, recipe.train.seed)
    size = ds.size if isinstance(ds.size, int) else max(ds.size)
    spec = from_dict(DiffusionSpec, recipe.model, "model").resolved(
        sample_size=size, channels=ds.channels, num_classes=ds.num_classes)
    torch.manual_seed(recipe.train.seed)
    model = DiffusionModel(build_unet(spec), build_scheduler(spec),
                           ds.classes if spec.num_classes == ds.num_classes else None)
    meta = {"dataset": {"path": str(ds.path.resolve()), "content_hash": ds.content_hash}}
    return DiffusionObjective(model, spec, device, meta), data
