"""The loop's optimizer machinery: mixed precision, grad scaling, clipping, stepping, EMA.

`Stepper` is the one place that turns a loss into an optimizer step, for both objective kinds:
backward always runs outside autocast, and with fp16 the grad scaler's `update()` runs once per
round in which each optimizer stepped at most once (torch's GradScaler forbids stepping one
optimizer twice between updates): one per loop step for a single optimizer or a DCGAN (critic,
then generator), `n_critic` per loop step for WGAN-GP, whose critic steps `n_critic` times.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from genforge.common.config import TrainConfig
from genforge.train.objective import OptimizerSpec


class Stepper:
    def __init__(self, specs: list[OptimizerSpec], cfg: TrainConfig, device: torch.device, dtype: torch.dtype):
        self.specs = specs
        self.grad_clip = cfg.grad_clip if cfg.grad_clip else math.inf
        self.device_type, self.dtype = device.type, dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self._stepped: set[int] = set()  # optimizers stepped since the scaler's last update

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [s.optimizer for s in self.specs]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes run under this; backward never does."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def set_lr(self, lr: float) -> None:
        # a param group may scale it again (latent diffusion's learned token rows learn faster than the UNet)
        for spec in self.specs:
            for group in spec.optimizer.param_groups:
                group["lr"] = lr * spec.lr_scale * group.get("lr_scale", 1.0)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, i: int) -> float:
        """Clip and step optimizer `i` on its accumulated gradients; returns the gradient norm."""
        opt = self.specs[i].optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP's parameters are shards (DTensors): the norm over all of them
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(opt)
            self._stepped.add(i)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm)

    def update(self, i: int, loss: torch.Tensor) -> float:
        """Backpropagate `loss` (outside autocast) and step optimizer `i` (the MultiStep path)."""
        if self.scaler is not None and i in self._stepped:
            # A second step of this optimizer within one loop step starts a new round; the scale
            # changes before this loss is scaled, never between its backward and its unscale.
            self._update_scale()
        self.backward(loss)
        return self.step(i)

    def grad(self, output: torch.Tensor, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """d output / d inputs, differentiable (for a gradient penalty); computed outside autocast and,
        under fp16, on the scaled output and then unscaled, so small gradients do not underflow
        (the gradient-penalty recipe of torch's AMP examples)."""
        if self.scaler is None:
            return torch.autograd.grad(output, inputs, create_graph=True)
        scaled = torch.autograd.grad(self.scaler.scale(output), inputs, create_graph=True)
        inv = 1.0 / self.scaler.get_scale()
        return tuple(g * inv for g in scaled)

    def end_step(self) -> None:
        """Called once at the end of every loop step."""
        if self.scaler is not None and self._stepped:
            self._update_scale()

    def _update_scale(self) -> None:
        self.scaler.update()
        self._stepped.clear()


class EMA:
    """Exponential moving average of the trained modules' floating-point state."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {n: {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}
                       for n, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module]) -> None:
        for n, m in modules.items():
            state = m.state_dict()
            shadow = list(self.shadow[n].values())
            live = [state[k] for k in self.shadow[n]]
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, modules: dict[str, torch.nn.Module]) -> Iterator[None]:
        """Temporarily load EMA weights into the modules (for eval and export)."""
        saved = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
        for n, m in modules.items():
            m.load_state_dict(self.shadow[n], strict=False)
        try:
            yield
        finally:
            for n, m in modules.items():
                m.load_state_dict(saved[n])


def maybe(ctx: contextlib.AbstractContextManager | None) -> contextlib.AbstractContextManager:
    return ctx if ctx is not None else contextlib.nullcontext()
