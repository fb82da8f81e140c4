"""DCGAN generator and discriminator / WGAN-GP critic on diffusers' ModelMixin/ConfigMixin.

Generator: (z [+ class embedding]) -> linear to 4x4 -> [transposed conv stride 2, BatchNorm, ReLU]
-> conv 3x3 -> tanh, for sides 8..64 (powers of two). With `num_classes > 0` it is class-
conditional (the label's embedding is concatenated to z) and the discriminator becomes a
projection discriminator (Miyato & Koyama, 2018): its score gains <embed(y), features>.

Discriminator norms: "batch" for DCGAN (as in Radford et al.); "layer" (GroupNorm with one group,
i.e. LayerNorm over C, H, W) or "none" for the WGAN-GP critic, whose gradient penalty is per
sample and would be wrong with batch statistics mixing samples.

A model folder holds `generator/` and `discriminator/` (each `save_pretrained`) and genforge.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from genforge.common.errors import ConfigError, RunError
from genforge.models.vae import check_image_geometry, read_meta, resolve_model_dir

NORMS = ("batch", "layer", "none")


def _levels(sample_size: int, channels: int) -> int:
    if sample_size < 8:
        raise ConfigError(f"model: image size {sample_size} is too small for the GAN (use 8..64)")
    check_image_geometry(sample_size, channels, 0)
    return int(math.log2(sample_size // 4))  # stride-2 steps between 4x4 and the image


class Generator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, sample_size: int = 16, channels: int = 1, latent_dim: int = 64, base_channels: int = 32,
                 num_classes: int = 0, class_embed_dim: int = 16):
        super().__init__()
        n = _levels(sample_size, channels)
        widths = [base_channels * 2 ** (n - i) for i in range(n + 1)]  # 4x4 widest ... image narrowest
        cond = class_embed_dim if num_classes > 0 else 0
        self.class_embed = nn.Embedding(num_classes, class_embed_dim) if num_classes > 0 else None
        self.fc = nn.Linear(latent_dim + cond, widths[0] * 16, bias=False)
        self.fc_norm = nn.BatchNorm1d(widths[0] * 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                          nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
            for cin, cout in zip(widths, widths[1:]))
        self.conv_out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self.apply(_dcgan_init)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.class_embed is not None:
            if labels is None:
                raise ConfigError("this generator is class-conditional: give class labels")
            z = torch.cat([z, self.class_embed(labels)], dim=1)
        h = F.relu(self.fc_norm(self.fc(z))).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            h = block(h)
        return torch.tanh(self.conv_out(h))

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.config.latent_dim, generator=generator).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, seed: int | None = None,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """`n` images in [-1, 1]; the same seed gives the same images. A conditional generator
        without `labels` cycles through the classes."""
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        z = self.noise(n, generator)
        if self.config.num_classes > 0 and labels is None:
            labels = torch.arange(n) % self.config.num_classes
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long).to(self.device).expand(n)
        return self(z, labels)


class Discriminator(ModelMixin, ConfigMixin):
    """One unbounded score per image (a logit for DCGAN, a critic value for WGAN-GP)."""

    @register_to_config
    def __init__(self, sample_size: int = 16, channels: int = 1, base_channels: int = 32, norm: str = "batch",
                 num_classes: int = 0):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.norm: {norm!r} is not one of {', '.join(NORMS)}")
        n = _levels(sample_size, channels)
        widths = [base_channels * 2 ** i for i in range(n + 1)]
        self.conv_in = nn.Conv2d(channels, widths[0], 3, padding=1)  # no norm on the first layer (DCGAN)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=norm == "none"), _norm(norm, cout),
                          nn.LeakyReLU(0.2, inplace=True))
            for cin, cout in zip(widths, widths[1:]))
        feat = widths[-1] * 16
        self.head = nn.Linear(feat, 1)
        self.class_embed = nn.Embedding(num_classes, feat) if num_classes > 0 else None
        self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = F.leaky_relu(self.conv_in(x), 0.2)
        for block in self.blocks:
            h = block(h)
        h = h.flatten(1)
        score = self.head(h).squeeze(1)
        if self.class_embed is not None:
            if labels is None:
                raise ConfigError("this discriminator is class-conditional: give class labels")
            score = score + (self.class_embed(labels) * h).sum(1)
        return score


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


def _dcgan_init(m: nn.Module) -> None:
    """N(0, 0.02) weights, norm scales N(1, 0.02): the DCGAN paper's initialisation."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[Generator, dict]:
    """(Generator in eval mode, genforge metadata) from a GAN run or model folder."""
    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    if meta.get("family") not in (None, "gan") or not (model_dir / "generator" / "config.json").is_file():
        raise RunError(f"{path} holds no GAN generator (expected {model_dir / 'generator'}/config.json)")
    return Generator.from_pretrained(model_dir / "generator").to(device).eval(), meta
