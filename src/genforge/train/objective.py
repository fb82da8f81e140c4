"""What a model family gives the one training loop.

A family never subclasses the loop. It hands over two small objects:

* a `DataSource`: batches that are a pure function of their index, so "data position" in a
  checkpoint is one integer and resume is exact;
* an `Objective`: the modules being trained, their optimizers, and either `loss(batch)` (one
  optimizer; the loop does accumulation, clipping and the step) or `step(batch, update)` (several
  optimizers, e.g. a GAN alternating critic and generator; `update(i, loss)` backpropagates `loss`
  and steps optimizer `i` with the loop's clipping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from genforge.common.config import TrainConfig


class DataSource(Protocol):
    tokens_per_batch: int | None  # tokens in one `train_batch` (None for image families)

    def train_batch(self, index: int) -> Any:
        """The `index`-th training batch; the same index always gives the same batch."""

    def val_batches(self, n: int) -> Iterable[Any]:
        """A fixed list of up to `n` validation batches (the same ones every eval)."""


class Objective(Protocol):
    modules: dict[str, nn.Module]  # trained, checkpointed, EMA'd when asked

    def optimizers(self, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
        ...

    def eval_step(self, batch: Any) -> dict[str, float]:
        """Validation metrics of one batch; must contain "loss" (lower is better)."""

    def signature(self) -> dict:
        """The model config; resuming a run with a different one is refused."""

    def export(self, model_dir: Path) -> None:
        """Write the trained model in its ecosystem's layout (HF / diffusers) into `model_dir`."""


@runtime_checkable
class SingleLoss(Protocol):
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        ...


@runtime_checkable
class MultiStep(Protocol):
    def step(self, batch: Any, update: Callable[[int, torch.Tensor], None]) -> dict[str, float]:
        ...


def adamw(params: Iterable[nn.Parameter] | Iterable[dict], cfg: TrainConfig, lr: float | None = None,
          device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, fused where the device supports it."""
    params = list(params)
    if params and isinstance(params[0], nn.Parameter):
        decay = [p for p in params if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
        params = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr or cfg.lr, betas=cfg.betas, fused=fused)
