"""The loop's optimizer stepping on the GAN path: grad-scaler updates per step, backward outside autocast."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from genforge.common.config import TrainConfig
from genforge.models.gan import Discriminator, Generator
from genforge.train.gan import GANObjective, GANSpec
from genforge.train.optim import Stepper


def tiny_gan(loss: str, n_critic: int = 1) -> GANObjective:
    torch.manual_seed(0)
    g = Generator(sample_size=8, channels=1, latent_dim=8, base_channels=8, num_classes=0)
    d = Discriminator(sample_size=8, channels=1, base_channels=8, norm="layer", num_classes=0)
    spec = GANSpec(loss=loss, latent_dim=8, g_channels=8, d_channels=8, n_critic=n_critic, conditional=False)
    return GANObjective(g, d, spec, dataset=None, exclude=[], batch_size=4, device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("loss, n_critic, updates_per_step", [("dcgan", 1, 1), ("wgan-gp", 3, 3)])
def test_grad_scaler_updates_once_per_round_and_backward_runs_outside_autocast(loss, n_critic, updates_per_step,
                                                                             monkeypatch):
    gan = tiny_gan(loss, n_critic)
    cfg = TrainConfig(max_steps=10, lr=1e-3, precision="fp16")
    stepper = Stepper(gan.optimizers(cfg), cfg, torch.device("cpu"), torch.float16)
    assert stepper.scaler is not None
    update = mock.Mock(wraps=stepper.scaler.update)
    stepper.scaler.update = update
    in_autocast: list[bool] = []
    for m in gan.modules.values():
        for p in m.parameters():
            p.register_hook(lambda grad: in_autocast.append(torch.is_autocast_enabled("cpu")) or grad)
    real_grad = torch.autograd.grad
    grad_in_autocast: list[bool] = []

    def spy_grad(*args, **kwargs):  # the gradient penalty's input gradients are a backward pass too
        grad_in_autocast.append(torch.is_autocast_enabled("cpu"))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy_grad)
    batch = {"images": torch.rand(4 * n_critic, 1, 8, 8) * 2 - 1, "labels": torch.zeros(4 * n_critic, dtype=torch.long)}
    steps = 3
    for _ in range(steps):
        row = gan.step(batch, stepper)
        stepper.end_step()
    assert {"loss_g", "loss_d"} <= set(row)
    # one update per round in which each optimizer stepped once: DCGAN (D then G) once per step;
    # WGAN-GP steps its critic n_critic times, and GradScaler allows one step per optimizer per update
    assert update.call_count == steps * updates_per_step
    assert in_autocast and not any(in_autocast)  # every gradient was computed outside autocast
    assert len(grad_in_autocast) == (steps * n_critic if loss == "wgan-gp" else 0) and not any(grad_in_autocast)


def test_single_optimizer_path_updates_the_scaler_once_per_step():
    model = torch.nn.Linear(4, 1)
    cfg = TrainConfig(max_steps=10, lr=1e-3, precision="fp16", grad_accum=4)
    from genforge.train.objective import OptimizerSpec, adamw

    stepper = Stepper([OptimizerSpec(adamw(model.parameters(), cfg))], cfg, torch.device("cpu"), torch.float16)
    update = mock.Mock(wraps=stepper.scaler.update)
    stepper.scaler.update = update
    for _ in range(2):
        for _ in range(cfg.grad_accum):
            with stepper.autocast():
                loss = model(torch.randn(2, 4)).float().pow(2).mean()
            stepper.backward(loss / cfg.grad_accum)
        stepper.step(0)
        stepper.end_step()
    assert update.call_count == 2


def test_lr_scale_is_part_of_the_optimizer_spec():
    gan = tiny_gan("dcgan")
    gan.spec.d_lr_scale = 2.0
    cfg = TrainConfig(max_steps=10, lr=1e-3)
    stepper = Stepper(gan.optimizers(cfg), cfg, torch.device("cpu"), torch.float32)
    stepper.set_lr(0.01)
    g_opt, d_opt = stepper.optimizers
    assert {grp["lr"] for grp in g_opt.param_groups} == {0.01}
    assert {grp["lr"] for grp in d_opt.param_groups} == {0.02}
    assert all("lr_scale" not in grp for o in stepper.optimizers for grp in o.param_groups)
