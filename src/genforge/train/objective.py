"""What a model family gives the one training loop.

A family never subclasses the loop. It hands over two small objects:

* a `DataSource`: batches that are a pure function of their index, so "data position" in a
  checkpoint is one integer and resume is exact;
* an `Objective`: the modules being trained, their optimizers (each an `OptimizerSpec`: the
  optimizer and the share of the scheduled learning rate it gets), and either
  `SingleLoss.loss(batch)` (one optimizer; the loop does accumulation, clipping and the step) or
  `MultiStep.step(batch, stepper)` (several optimizers, e.g. a GAN alternating critic and
  generator: the family computes each loss under `stepper.autocast()` and hands it to
  `stepper.update(i, loss)`, which backpropagates outside autocast and steps optimizer `i` with
  the loop's clipping and grad scaling; a gradient penalty takes its input gradients from
  `stepper.grad(output, inputs)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from genforge.common.config import TrainConfig


class DataSource(Protocol):
    tokens_per_batch: int | None  # tokens in one `train_batch` (None for image families)

    def train_batch(self, index: int) -> Any:
        """The `index`-th training batch; the same index always gives the same batch."""

    def val_batches(self, n: int) -> Iterable[Any]:
        """A fixed list of up to `n` validation batches (the same ones every eval)."""

    # Optional, for several processes (train/distributed.py): `shard(batch, rank, world)`, the rows of a
    # training batch that process `rank` of `world` trains on, where a plain split of the rows would
    # separate rows that belong together. Without it, each process takes an equal run of rows.


@dataclass
class OptimizerSpec:
    """One optimizer and its learning rate as a multiple of the loop's schedule (a GAN's critic
    may learn faster than its generator); the loop sets `lr = schedule(step) * lr_scale`."""

    optimizer: torch.optim.Optimizer
    lr_scale: float = 1.0


class Objective:
    """The base of every family's objective: subclass `SingleLoss` or `MultiStep`."""

    modules: dict[str, nn.Module]  # trained, checkpointed, EMA'd when asked

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        raise NotImplementedError

    def eval_step(self, batch: Any) -> dict[str, float]:
        """Validation metrics of one batch; must contain "loss" (lower is better)."""
        raise NotImplementedError

    def signature(self) -> dict:
        """The model config; resuming a run with a different one is refused."""
        raise NotImplementedError

    def export(self, model_dir: Path) -> None:
        """Write the trained model in its ecosystem's layout (HF / diffusers) into `model_dir`."""
        raise NotImplementedError

    def parallel_modules(self) -> dict[str, nn.Module]:
        """The modules DDP or FSDP goes on when several processes train (train/distributed.py): the ones
        whose forward the loss calls, since both work through forward hooks. By default the trained ones."""
        return self.modules

    def describe(self) -> dict[str, Any]:
        """Rows for the training section of report.md; by default the parameter count."""
        return {"parameters": sum(p.numel() for m in self.modules.values() for p in m.parameters())}


class SingleLoss(Objective):
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class Stepper(Protocol):
    """What the loop hands `MultiStep.step`: forward under `autocast()`, then `update(i, loss)`."""

    def autocast(self) -> contextlib.AbstractContextManager:
        ...

    def update(self, i: int, loss: torch.Tensor) -> float:
        ...

    def grad(self, output: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """d output / d inputs with a graph (a gradient penalty), computed outside autocast."""
        ...


class MultiStep(Objective):
    def step(self, batch: Any, stepper: Stepper) -> dict[str, float]:
        raise NotImplementedError


def adamw(params: Iterable[nn.Parameter] | Iterable[dict], cfg: TrainConfig, lr: float | None = None,
          device: torch.device | None = None, betas: tuple[float, float] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, fused where the device supports it."""
    params = list(params)
    if params and isinstance(params[0], nn.Parameter):
        decay = [p for p in params if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
        params = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    fused = device is not None and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr or cfg.lr, betas=betas or tuple(cfg.betas), fused=fused)
