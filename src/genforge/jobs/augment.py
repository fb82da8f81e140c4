"""`genforge augment RUN --minority-class K`: does oversampling class K with a conditional
generator help a classifier that saw only a few real images of K?

1. Drop all but `keep_fraction` of class K from the training split (seeded: `minority_subset`).
2. Train the small CNN classifier through the loop on that set (the baseline).
3. Generate images of K with the run's conditional model until K is as common as the other
   classes again, and train the same classifier, same seed and steps, on the union.
4. Recall on K and accuracy, on the untouched held-out split, for both.

For an honest study the generator must not have seen the dropped images either; the result says
whether the run recorded that it was trained on the same reduced set (`_provenance.minority` in
its recipe.yaml, written by benchmarks/digits_generation.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from genforge.common.config import Recipe, from_dict
from genforge.common.errors import ConfigError, GenforgeError
from genforge.common.progress import console
from genforge.common.runs import RunDir, atomic_write_text, update_report
from genforge.data.images import ImageBatches, ImageDataConfig
from genforge.jobs.image_eval import classifier_recipe, run_dataset
from genforge.models.classifier import ClassifierSpec, build_classifier, embed
from genforge.models.diffusion import DiffusionModel
from genforge.models.image_generators import load_image_generator
from genforge.train.classifier import ClassifierObjective
from genforge.train.loop import pick_device, train


def minority_subset(labels: torch.Tensor, minority: int, keep_fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask over `labels`: every image of other classes, `keep_fraction` of class `minority`
    (at least one), chosen by `seed`. The benchmark trains the generator on the same mask."""
    if not 0 < keep_fraction <= 1:
        raise ConfigError(f"--keep-fraction: {keep_fraction} is out of range (must be in (0, 1])")
    idx = torch.nonzero(labels == minority).flatten()
    if len(idx) == 0:
        raise GenforgeError(f"class {minority} has no training images")
    keep_n = max(1, round(keep_fraction * len(idx)))
    order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
    mask = labels != minority
    mask[idx[order[:keep_n]]] = True
    return mask


def _train_classifier(run: RunDir, name: str, images: torch.Tensor, labels: torch.Tensor,
                      val: tuple[torch.Tensor, torch.Tensor], class_names: list[str], seed: int,
                      max_steps: int | None):
    recipe = from_dict(Recipe, {**classifier_recipe(max_steps), "name": name, "family": "classifier", "dataset": ".",
                                "out_dir": str(run.path / "augment")})
    cfg = recipe.train
    cfg.seed = seed
    device = pick_device(cfg.device)
    spec = from_dict(ClassifierSpec, recipe.model, "model")
    torch.manual_seed(seed)
    model = build_classifier(spec, in_channels=images.shape[1], num_classes=len(class_names))
    objective = ClassifierObjective(model, spec, class_names, device, meta={"study": name})
    aug = from_dict(ImageDataConfig, recipe.data, "data").augment
    data = ImageBatches(images, labels, cfg.batch_size, seed, aug, val=val)
    sub = RunDir(run.path / "augment" / name)
    shutil.rmtree(sub.path, ignore_errors=True)  # a re-run of the study starts its classifiers afresh
    sub.create()
    train(objective, data, cfg, sub, device=device)
    return objective.model.eval()


def _recall_accuracy(model, images: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[float, float]:
    _, logits = embed(model, images)
    pred = logits.argmax(-1)
    return float((pred[labels == k] == k).float().mean()), float((pred == labels).float().mean())


def augmentation_study(run: str | Path, minority_class: str | int, keep_fraction: float = 0.1, seed: int = 0,
                       *, guidance: float = 1.5, steps: int = 50, classifier_steps: int | None = None) -> dict:
    """Recall on `minority_class` without and with generated images; see the module docstring."""
    run_dir = RunDir.open(run)
    gen = load_image_generator(run_dir.path)
    if not gen.conditional:
        raise GenforgeError(f"augment: {run_dir.path} holds an unconditional {gen.family} model; the study "
                            f"needs a class-conditional one (e.g. a diffusion run on a labelled dataset)")
    k = gen.resolve_class(minority_class)
    ds, exclude = run_dataset(run_dir)
    if k in exclude:
        raise GenforgeError(f"augment: class {gen.class_names[k]!r} was excluded from this run's training data")
    train_x, train_y = ds.split("train", exclude)
    val = ds.split("val", exclude)
    mask = minority_subset(train_y, k, keep_fraction, seed)
    red_x, red_y = train_x[mask], train_y[mask]
    kept = int((red_y == k).sum())
    others = [int((train_y == c).sum()) for c in sorted(set(train_y.tolist())) if c != k]
    n_gen = max(0, round(sum(others) / len(others)) - kept)
    console.print(f"augment: class {gen.class_names[k]!r} keeps {kept} of {int((train_y == k).sum())} "
                  f"training images; generating {n_gen}")
    kw = {"guidance": guidance, "steps": steps, "sampler": "ddim"} if isinstance(gen, DiffusionModel) else {}
    synth = gen.sample(n_gen, labels=[k] * n_gen, seed=seed + 1, **kw) if n_gen else train_x[:0]

    base = _train_classifier(run_dir, "baseline", red_x, red_y, val, ds.classes, seed,
                             classifier_steps)
    aug = _train_classifier(run_dir, "augmented", torch.cat([red_x, synth]),
                            torch.cat([red_y, torch.full((n_gen,), k, dtype=torch.long)]), val, ds.classes, seed,
                            classifier_steps)
    rec_b, acc_b = _recall_accuracy(base, *val, k)
    rec_a, acc_a = _recall_accuracy(aug, *val, k)
    prov = run_dir.read_recipe().get("_provenance", {}).get("minority") or {}
    clean = (prov.get("class") == gen.class_names[k] and prov.get("keep_fraction") == keep_fraction
             and prov.get("seed") == seed)
    result = {"minority_class": gen.class_names[k], "kept_real": kept, "generated": n_gen,
              "recall_without": rec_b, "recall_with": rec_a, "recall_gain_points": 100 * (rec_a - rec_b),
              "accuracy_without": acc_b, "accuracy_with": acc_a, "val_images_of_class": int((val[1] == k).sum()),
              "generator_trained_on_reduced_set": clean}
    atomic_write_text(run_dir.path / "augment" / "result.json", json.dumps(result, indent=2))
    note = ("The generator was trained on the same reduced set." if clean else
            "**Caveat:** the generator was trained on the full training set, so it has seen the dropped "
            "images; train it on the reduced set for an honest study (benchmarks/digits_generation.py does).")
    update_report(run_dir, "augmentation", "\n".join([
        "## Augmentation study", "",
        f"Class `{gen.class_names[k]}` cut to {kept} real training images; {n_gen} generated images added. "
        f"Same CNN, seed and steps; scored on the {len(val[0])} held-out images. {note}", "",
        "| classifier | recall on class | accuracy |", "|---|---|---|",
        f"| without generated images | {100 * rec_b:.1f}% | {100 * acc_b:.1f}% |",
        f"| with generated images | {100 * rec_a:.1f}% | {100 * acc_a:.1f}% |"]))
    return result
