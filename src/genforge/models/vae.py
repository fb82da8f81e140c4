"""A small convolutional VAE on diffusers' ModelMixin/ConfigMixin, so it saves and loads like the UNet.

    encoder: conv_in -> [conv stride 2, GroupNorm, SiLU] x levels -> flatten -> to_stats (mu, logvar)
    decoder: fc -> [upsample x2, conv, GroupNorm, SiLU] x levels -> conv_out

The decoder's layers are named `decoder.fc`, `decoder.blocks.<i>.conv`, `decoder.conv_out` so a
peft LoRA can target exactly them (`decoder_lora_targets`). Images are in [-1, 1]; the likelihood
is either a Gaussian with fixed variance (reconstruction = sum of squared errors) or a Bernoulli on
the [0, 1] view (the decoder outputs logits). `per_image_losses` is the one place the ELBO terms are
computed, for training and for anomaly scoring alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from genforge.common.errors import ConfigError, RunError

META_FILE = "genforge.json"
LIKELIHOODS = ("gaussian", "bernoulli")


def check_image_geometry(sample_size: int, channels: int, levels: int, where: str = "model") -> int:
    """The spatial side after `levels` halvings; ConfigError for sizes the conv stacks cannot take."""
    if sample_size < 4 or sample_size & (sample_size - 1):
        raise ConfigError(f"{where}: image size {sample_size} is not supported; use a power of two from 8 "
                          "to 64 (prepare the dataset with --size 16, for example)")
    if channels not in (1, 3):
        raise ConfigError(f"{where}: {channels} channels are not supported (1 or 3)")
    bottom = sample_size // 2 ** levels
    if bottom < 1:
        raise ConfigError(f"{where}: {levels} levels halve a {sample_size}px image below 1px; use at most "
                          f"{int(math.log2(sample_size))} levels (entries of block_out_channels)")
    return bottom


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
        self.norm = _norm(cout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = _norm(cout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest upsampling + conv instead of a transposed conv: no checkerboard artefacts
        return F.silu(self.norm(self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))))


class _Encoder(nn.Module):
    def __init__(self, channels: int, blocks: list[int], groups: int, bottom: int, latent_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, blocks[0], 3, padding=1)
        self.blocks = nn.ModuleList(_Down(cin, cout, groups) for cin, cout in zip([blocks[0]] + blocks[:-1], blocks))
        self.to_stats = nn.Linear(blocks[-1] * bottom * bottom, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.silu(self.conv_in(x))
        for block in self.blocks:
            h = block(h)
        mu, logvar = self.to_stats(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training


class _Decoder(nn.Module):
    def __init__(self, channels: int, blocks: list[int], groups: int, bottom: int, latent_dim: int):
        super().__init__()
        rev = blocks[::-1]
        self.bottom, self.top = bottom, rev[0]
        self.fc = nn.Linear(latent_dim, rev[0] * bottom * bottom)
        self.blocks = nn.ModuleList(_Up(cin, cout, groups) for cin, cout in zip(rev, rev[1:] + [rev[-1]]))
        self.conv_out = nn.Conv2d(rev[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.fc(z)).view(-1, self.top, self.bottom, self.bottom)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


class ConvVAE(ModelMixin, ConfigMixin):
    """Convolutional VAE for 1- or 3-channel images of side 8..64 (powers of two)."""

    @register_to_config
    def __init__(self, sample_size: int = 16, channels: int = 1, latent_dim: int = 16,
                 block_out_channels: tuple[int, ...] = (32, 64), norm_groups: int = 8,
                 likelihood: str = "gaussian"):
        super().__init__()
        blocks = list(block_out_channels)
        if not blocks or any(c < 1 for c in blocks):
            raise ConfigError(f"model.block_out_channels: {blocks} must be a non-empty list of positive widths")
        if likelihood not in LIKELIHOODS:
            raise ConfigError(f"model.likelihood: {likelihood!r} is not one of {', '.join(LIKELIHOODS)}")
        bottom = check_image_geometry(sample_size, channels, len(blocks))
        self.encoder = _Encoder(channels, blocks, norm_groups, bottom, latent_dim)
        self.decoder = _Decoder(channels, blocks, norm_groups, bottom, latent_dim)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameter: the mean (gaussian) or logits (bernoulli)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]."""
        out = self.decoder(z)
        return torch.tanh(out / 2) if self.config.likelihood == "bernoulli" else out.clamp(-1, 1)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder output, mu, logvar) with z drawn by the reparameterisation trick."""
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return self.decode_raw(mu + eps * (0.5 * logvar).exp()), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """`n` images in [-1, 1] decoded from the prior; the same seed gives the same images."""
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.config.latent_dim, generator=generator)
        return self.decode(z.to(self.device, self.dtype))

    def reconstruction_nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-image negative log-likelihood (up to a constant), summed over pixels."""
        if self.config.likelihood == "bernoulli":
            nll = F.binary_cross_entropy_with_logits(out.float(), (x.float() + 1) / 2, reduction="none")
        else:  # Gaussian with variance 1/2: the sum of squared errors
            nll = (out.float() - x.float()).pow(2)
        return nll.flatten(1).sum(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-image KL(q(z|x) || N(0, I))."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def per_image_losses(model: ConvVAE, x: torch.Tensor, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction NLL, KL) per image, one posterior sample each."""
    base = getattr(model, "get_base_model", lambda: model)()  # a peft-wrapped VAE too
    out, mu, logvar = model(x, generator=generator)
    return base.reconstruction_nll(out, x), kl_divergence(mu, logvar)


def decoder_lora_targets(model: ConvVAE) -> list[str]:
    """Full names of the decoder's linear and conv layers: what a decoder LoRA adapts."""
    return [name for name, m in model.named_modules()
            if name.startswith("decoder.") and isinstance(m, (nn.Linear, nn.Conv2d))]


def save_meta(model_dir: Path, meta: dict) -> None:
    (Path(model_dir) / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_meta(model_dir: str | Path) -> dict:
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory's model/ folder, or the folder itself when it already is a model folder."""
    p = Path(path)
    if (p / "model").is_dir():
        p = p / "model"
    if not p.is_dir():
        raise RunError(f"model not found: {path} (expected a run directory or its model/ folder)")
    return p


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[ConvVAE, dict]:
    """(ConvVAE in eval mode, genforge metadata) from a VAE run or model folder."""
    model_dir = resolve_model_dir(path)
    meta = read_meta(model_dir)
    if meta.get("family") not in (None, "vae"):
        raise RunError(f"{path} holds a {meta['family']} model, not a VAE")
    if not (model_dir / "config.json").is_file():
        raise RunError(f"{model_dir} has no config.json; is the training finished?")
    return ConvVAE.from_pretrained(model_dir).to(device).eval(), meta
