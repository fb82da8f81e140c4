"""The classifier family: cross-entropy on the image dataset's labels.

Image evaluation trains one of these per dataset (jobs/image_eval.py) and uses its penultimate
layer as the FID/KID feature space and its predictions for class accuracy and mode coverage.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.common.config import Recipe, TrainConfig, from_dict, to_dict
from genforge.data.images import ImageBatches, load_image_data
from genforge.models.classifier import ClassifierSpec, ImageClassifier, build_classifier, save_classifier
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw


class ClassifierObjective(SingleLoss):
    def __init__(self, model: ImageClassifier, spec: ClassifierSpec, class_names: list[str],
                 device: torch.device, meta: dict | None = None):
        self.model = model.to(device)
        self.spec = spec
        self.class_names = class_names
        self.device = device
        self.meta = meta or {}
        self.modules = {"classifier": self.model}

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        return [OptimizerSpec(adamw(self.model.parameters(), cfg, device=self.device))]

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.model(batch["images"])
        loss = F.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": acc.detach()}

    def eval_step(self, batch: dict) -> dict[str, float]:
        logits = self.model(batch["images"])
        return {"loss": float(F.cross_entropy(logits, batch["labels"])),
                "accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}

    def signature(self) -> dict:
        return {**to_dict(self.spec), "num_classes": len(self.class_names)}

    def export(self, model_dir: Path) -> None:
        save_classifier(self.model, model_dir, self.class_names, extra=self.meta)

    def describe(self) -> dict:
        return {"parameters": sum(p.numel() for p in self.model.parameters()), "architecture": "ImageClassifier"}


def build(recipe: Recipe, device: torch.device) -> tuple[ClassifierObjective, ImageBatches]:
    ds, data, _ = load_image_data(recipe.dataset, recipe.data, recipe.train.batch_size, recipe.train.seed)
    spec = from_dict(ClassifierSpec, recipe.model, "model")
    torch.manual_seed(recipe.train.seed)
    model = build_classifier(spec, in_channels=ds.channels, num_classes=ds.num_classes)
    meta = {"dataset": {"path": str(ds.path.resolve()), "content_hash": ds.content_hash}}
    return ClassifierObjective(model, spec, ds.classes, device, meta), data
