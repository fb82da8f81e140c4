"""Image augmentation on whole batches with torch ops, deterministic given a torch.Generator.

The recipe's `data.augment` section is an `AugmentConfig`; everything is off by default (a digit
flipped left-right is not the same digit, so flips are never on unless asked). Random resized crop
and horizontal flip are one affine warp per image, applied to the batch in one `grid_sample`;
brightness and contrast act on the [0, 1] view of the [-1, 1] images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genforge.common.config import Spec, rng
from genforge.common.errors import ConfigError


class AugmentConfig(Spec):
    """The recipe's `data.augment` section."""

    crop_prob: float = rng(0.0, min=0, max=1, help="probability of a random resized crop per image")
    crop_scale: tuple[float, float] = (0.7, 1.0)  # area of the crop as a fraction of the image
    crop_ratio: tuple[float, float] = (0.8, 1.25)  # aspect ratio (w/h) range of the crop
    flip_prob: float = rng(0.0, min=0, max=1, help="horizontal flip probability (off for digits)")
    brightness: float = rng(0.0, min=0, max=1, help="brightness factor drawn from [1-b, 1+b]")
    contrast: float = rng(0.0, min=0, max=1, help="contrast factor drawn from [1-c, 1+c]")

    def check(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.augment.crop_scale: {list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        rlo, rhi = self.crop_ratio
        if not 0 < rlo <= rhi:
            raise ConfigError(f"data.augment.crop_ratio: {list(self.crop_ratio)} must satisfy 0 < min <= max")

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in (self.crop_prob, self.flip_prob, self.brightness, self.contrast))


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch (N x C x H x W, values in [-1, 1]); returns a new tensor.

    Every random number is drawn whether or not its transform fires, so the stream (and hence
    every later draw) does not depend on which probabilities are zero.
    """
    n = images.shape[0]
    if n == 0 or not cfg.enabled:
        return images

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    do_crop = torch.rand(n, generator=generator) < cfg.crop_prob
    area = uniform(*cfg.crop_scale)
    log_ratio = uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    pos_x, pos_y = uniform(-1.0, 1.0), uniform(-1.0, 1.0)
    do_flip = torch.rand(n, generator=generator) < cfg.flip_prob
    bright = uniform(1 - cfg.brightness, 1 + cfg.brightness)
    contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast)

    out = images.clone()
    warp = do_crop | do_flip
    if warp.any():
        # Crop width/height as fractions of the image; an affine grid over [-1, 1] with scale
        # (w, h) and a centre offset that keeps the crop inside the image.
        ratio = log_ratio.exp()
        w = torch.where(do_crop, (area * ratio).sqrt().clamp(max=1.0), torch.ones(n))
        h = torch.where(do_crop, (area / ratio).sqrt().clamp(max=1.0), torch.ones(n))
        cx, cy = pos_x * (1 - w), pos_y * (1 - h)
        sx = torch.where(do_flip, -w, w)  # a negative x scale mirrors the crop: flip for free
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        idx = warp.nonzero().squeeze(1)
        sub = images[idx]
        grid = F.affine_grid(theta[idx].to(sub.dtype), list(sub.shape), align_corners=False)
        out[idx] = F.grid_sample(sub, grid.to(sub.device), mode="bilinear", padding_mode="border",
                                 align_corners=False)
    if cfg.brightness > 0 or cfg.contrast > 0:
        x = (out + 1) / 2
        shape = (n,) + (1,) * (x.dim() - 1)
        x = x * bright.view(shape).to(x)
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        x = ((x - mean) * contrast.view(shape).to(x) + mean).clamp(0, 1)
        out = x * 2 - 1
    return out
