"""A small CNN image classifier whose penultimate layer is the feature space of FID/KID.

Inception features are the usual FID space, but they describe photographs; for 16x16 digits a
classifier trained on the same data sees what matters (stroke shapes that decide the class) and
costs milliseconds. It lives on diffusers' ModelMixin/ConfigMixin so it saves and loads like the
UNet (config.json + diffusion_pytorch_model.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from pydantic import Field
from torch import nn

from genforge.common.config import Spec, rng
from genforge.common.errors import ConfigError, RunError

META_FILE = "genforge.json"


class ClassifierSpec(Spec):
    """The recipe's `model:` section for family classifier."""

    channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    feature_dim: int = rng(64, min=2, help="width of the penultimate layer (the FID/KID features)")
    norm_groups: int = rng(8, min=1)
    dropout: float = rng(0.2, min=0, max=0.9)

    def check(self) -> None:
        if not self.channels:
            raise ConfigError("model.channels: give at least one conv width, e.g. [32, 64, 128]")
        for i, c in enumerate(self.channels):
            if c < 1 or c % self.norm_groups:
                raise ConfigError(f"model.channels[{i}]: {c} must be a positive multiple of "
                                  f"model.norm_groups ({self.norm_groups})")


class ImageClassifier(ModelMixin, ConfigMixin):
    """conv stages (two 3x3 convs + GroupNorm + SiLU, then 2x down) -> global pool -> features -> logits."""

    @register_to_config
    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: tuple[int, ...] = (32, 64, 128),
                 feature_dim: int = 64, norm_groups: int = 8, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(prev, c, 3, padding=1), nn.GroupNorm(norm_groups, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(norm_groups, c), nn.SiLU()]
            if i < len(channels) - 1:
                layers.append(nn.AvgPool2d(2))
            prev = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(prev, feature_dim), nn.SiLU())
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (batch, feature_dim)."""
        return self.head(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def build_classifier(spec: ClassifierSpec, *, in_channels: int, num_classes: int) -> ImageClassifier:
    if num_classes < 2:
        raise ConfigError(f"classifier: the dataset has {num_classes} class(es); a classifier needs at least 2")
    return ImageClassifier(in_channels=in_channels, num_classes=num_classes, channels=tuple(spec.channels),
                           feature_dim=spec.feature_dim, norm_groups=spec.norm_groups, dropout=spec.dropout)


def save_classifier(model: ImageClassifier, path: str | Path, class_names: list[str], extra: dict | None = None) -> None:
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    meta = {"family": "classifier", "classes": list(class_names), **(extra or {})}
    (path / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[ImageClassifier, dict]:
    """(model in eval mode, genforge.json metadata) from a model folder or a run directory."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    if not (path / "config.json").is_file():
        raise RunError(f"{path}: no classifier found (expected config.json)")
    model = ImageClassifier.from_pretrained(path).to(device).eval()
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8")) if (path / META_FILE).is_file() else {}
    return model, meta


@torch.no_grad()
def embed(model: ImageClassifier, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, logits) of images in [-1, 1], batched, on the CPU."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for lo in range(0, len(images), batch_size):
        f = model.features(images[lo:lo + batch_size].to(device).float())
        feats.append(f.cpu())
        logits.append(model.out(f).cpu())
    return torch.cat(feats).double(), torch.cat(logits)
