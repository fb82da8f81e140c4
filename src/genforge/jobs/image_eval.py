"""`genforge eval RUN` for image runs: FID/KID against the real-vs-real floor, class accuracy,
mode coverage and memorisation, with a PCA + GaussianMixture baseline in the same table.

The feature space is the penultimate layer of a small CNN trained on the run's dataset through
the one training loop and kept in RUN/classifier/ (a run of its own). Sibling runs on the same
dataset share it: the first eval trains it, later ones copy it.

Rows (each a set of images scored the same way):
* real held-out: the val split, i.e. what a perfect generator would score (the floor);
* the run's samples: DDIM-`steps` with guidance (diffusion), plus g=1 and unconditional rows for
  a conditional diffusion model; DDPM-1000 on a small sample only (it costs ~20x DDIM-50);
* PCA+GMM: the baseline.
FID is compared at one n for all rows (FID is biased upward at small n); KID is unbiased.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from genforge.common.config import Recipe, from_dict
from genforge.common.errors import ConfigError, RunError
from genforge.common.progress import console
from genforge.common.runs import RunDir, atomic_write_text, update_report
from genforge.data.images import ImageDataset, save_image_grid
from genforge.eval.image import (
    PCAGMMSampler,
    class_accuracy,
    fid_with_ci,
    kid_with_ci,
    mode_coverage,
    nearest_distances,
    per_class_accuracy,
)
from genforge.jobs.imagegen import grid_scale
from genforge.models.classifier import embed, load_classifier
from genforge.models.image_generators import load_image_generator

CLASSIFIER_RECIPE = {  # the same as configs/classifier.yaml
    "model": {"channels": [32, 64], "feature_dim": 64, "norm_groups": 8, "dropout": 0.2},
    "data": {"augment": {"crop_prob": 0.5, "crop_scale": [0.8, 1.0]}},
    "train": {"max_steps": 400, "batch_size": 128, "lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.05,
              "eval_every": 100, "eval_batches": 4, "log_every": 20, "checkpoint_every": 400, "keep_last": 1,
              "seed": 0},
}


def run_dataset(run: RunDir) -> tuple[ImageDataset, list[int]]:
    """The dataset a run recorded (checked by content hash) and the classes it left out."""
    tree = run.read_recipe()
    recorded = tree.get("_provenance", {}).get("dataset", {})
    path = recorded.get("path") or tree.get("dataset")
    if not path or not Path(path).is_dir():
        path = tree.get("dataset")
    ds = ImageDataset(path)
    if recorded.get("content_hash") not in (None, ds.content_hash):
        raise RunError(f"{run.path} was trained on a different version of {path} (content hash differs); "
                       f"evaluate against the data it was trained on")
    exclude = [ds.class_index(c) for c in (tree.get("data") or {}).get("exclude_classes", [])]
    return ds, exclude


def classifier_recipe(max_steps: int | None = None) -> dict:
    """CLASSIFIER_RECIPE, with fewer steps when asked (tests)."""
    tree = json.loads(json.dumps(CLASSIFIER_RECIPE))
    if max_steps is not None:
        tree["train"].update(max_steps=max_steps, eval_every=max_steps, checkpoint_every=max_steps)
    return tree


def ensure_classifier(run: RunDir, ds: ImageDataset, max_steps: int | None = None) -> torch.nn.Module:
    """RUN/classifier/model for this dataset: kept, copied from a sibling run, or trained now."""
    target = run.path / "classifier"

    def usable(folder: Path) -> bool:
        meta_path = folder / "model" / "genforge.json"
        if not meta_path.is_file():
            return False
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return meta.get("dataset", {}).get("content_hash") == ds.content_hash

    if not usable(target):
        sibling = next((p / "classifier" for p in sorted(run.path.parent.iterdir())
                        if p != run.path and usable(p / "classifier")), None)
        if target.exists():
            shutil.rmtree(target)  # trained on another dataset version: retrain
        if sibling is not None:
            console.print(f"reusing the domain classifier of {sibling.parent.name} (same dataset)")
            shutil.copytree(sibling, target)
        else:
            from genforge.jobs.train import run_loaded_recipe

            console.print(f"training the domain classifier for {ds.path} (once per dataset)")
            recipe = from_dict(Recipe, {**classifier_recipe(max_steps), "name": "classifier", "family": "classifier",
                                        "dataset": str(ds.path), "out_dir": str(run.path)})
            run_loaded_recipe(recipe)
    model, _ = load_classifier(target / "model")
    return model


def _score(name: str, images: torch.Tensor, labels: list[int] | None, *, clf, ref: dict, n_fid: int,
           num_classes: int, seconds: float | None = None, seed: int = 0) -> dict:
    feats, logits = embed(clf, images)
    pred = logits.argmax(-1).numpy()
    f = feats.numpy()
    row: dict = {"name": name, "n": len(images)}
    if len(f) >= n_fid:
        row.update(fid_with_ci(f[:n_fid], ref["feats"], seed=seed).as_dict("fid"))
    row.update(kid_with_ci(f, ref["feats"], seed=seed).as_dict("kid"))
    if labels is not None:
        row["class_accuracy"] = class_accuracy(pred, np.asarray(labels))
        row["per_class_accuracy"] = per_class_accuracy(pred, np.asarray(labels), num_classes)
    row["coverage"] = mode_coverage(pred, num_classes, classes=ref["classes"])
    dist = nearest_distances(images, ref["images"])
    row["nn_distance"] = float(np.median(dist))
    row["near_copies"] = float((dist < ref["copy_threshold"]).mean()) if "copy_threshold" in ref else 0.0
    if seconds is not None:
        row["samples_per_s"] = len(images) / max(seconds, 1e-9)
    return row


def evaluate_image_run(run: str | Path, num_samples: int = 500, *, guidance: float = 1.5, steps: int = 50,
                       ddpm_samples: int = 16, seed: int = 0, classifier_steps: int | None = None) -> dict:
    """Score an image run (diffusion, vae, gan); write RUN/eval/image_metrics.json and report.md.

    `num_samples` per row (FID uses min(num_samples, held-out images) of them, like the floor);
    `guidance`/`steps`: the DDIM setting of the main diffusion row; `ddpm_samples`: the size of the
    small DDPM-1000 row (0 skips it); `classifier_steps`: train the domain classifier shorter (tests).
    """
    if num_samples < 2:
        raise ConfigError(f"--num-samples: {num_samples} is too few (need at least 2; 500 is typical)")
    run_dir = RunDir.open(run)
    gen = load_image_generator(run_dir.path)
    ds, exclude = run_dataset(run_dir)
    clf = ensure_classifier(run_dir, ds, classifier_steps)
    train_x, train_y = ds.split("train", exclude)
    val_x, val_y = ds.split("val", exclude)
    classes = sorted(set(train_y.tolist()))
    n_fid = min(num_samples, len(val_x))
    val_order = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(seed))
    val_x, val_y = val_x[val_order], val_y[val_order]

    train_feats, _ = embed(clf, train_x)
    ref = {"feats": train_feats.numpy(), "images": train_x, "classes": classes}
    val_dist = nearest_distances(val_x, train_x)
    ref["copy_threshold"] = float(np.percentile(val_dist, 1))  # closer than 99% of real held-out images
    rows = [_score("real held-out (floor)", val_x, val_y.tolist(), clf=clf, ref=ref, n_fid=n_fid,
                   num_classes=ds.num_classes, seed=seed)]
    labels = [classes[i % len(classes)] for i in range(num_samples)] if gen.conditional else None
    grids: dict[str, torch.Tensor] = {}

    def add(name: str, n: int, **kw) -> None:
        lab = labels[:n] if labels is not None and kw.pop("conditional", True) else None
        t0 = time.perf_counter()
        images = gen.sample(n, labels=lab, seed=seed, **kw)
        rows.append(_score(name, images, lab, clf=clf, ref=ref, n_fid=n_fid, num_classes=ds.num_classes,
                           seconds=time.perf_counter() - t0, seed=seed))
        grids[name] = images[:64]
        console.print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1].items()
                                                if isinstance(v, float) and not k.endswith(("_low", "_high"))))

    if gen.family == "diffusion":
        g = guidance if gen.conditional else None
        label = f"diffusion DDIM-{steps}" + (f" g={g:g}" if g is not None else "")
        add(label, num_samples, guidance=g, steps=steps, sampler="ddim")
        if gen.conditional and guidance != 1.0:
            add(f"diffusion DDIM-{steps} g=1", num_samples, guidance=1.0, steps=steps, sampler="ddim")
        if gen.conditional:
            add(f"diffusion DDIM-{steps} unconditional", num_samples, steps=steps, sampler="ddim",
                conditional=False)
        if ddpm_samples:
            total = int(gen.scheduler.config.num_train_timesteps)
            add(f"diffusion DDPM-{total}" + (f" g={g:g}" if g is not None else "") + " (small sample)",
                min(ddpm_samples, num_samples), guidance=g, sampler="ddpm")
    else:
        kind = str(getattr(gen, "meta", {}).get("loss") or "").upper()
        add(f"{gen.family.upper()}{' ' + kind if kind else ''}" + (" class-conditional" if gen.conditional else ""),
            num_samples)

    t0 = time.perf_counter()
    base = PCAGMMSampler(seed=seed).fit(train_x, train_y if gen.conditional else None)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_images = base.sample(num_samples, labels=labels, seed=seed)
    rows.append(_score("PCA+GMM baseline", base_images, labels, clf=clf, ref=ref, n_fid=n_fid,
                       num_classes=ds.num_classes, seconds=time.perf_counter() - t0, seed=seed))
    rows[-1]["fit_seconds"] = fit_s
    grids["PCA+GMM baseline"] = base_images[:64]

    result = _summary(rows, gen.family)
    out = {"run": str(run_dir.path), "family": gen.family, "num_samples": num_samples, "n_fid": n_fid,
           "guidance": guidance, "steps": steps, "seed": seed, "feature_dim": int(train_feats.shape[1]),
           "classifier_val_accuracy": rows[0].get("class_accuracy"), "rows": rows, "summary": result}
    (run_dir.path / "eval").mkdir(exist_ok=True)
    atomic_write_text(run_dir.path / "eval" / "image_metrics.json", json.dumps(out, indent=2))
    write_evaluation_section(run_dir, out, grids, scale=grid_scale(int(val_x.shape[-1])))
    return result


def _summary(rows: list[dict], family: str) -> dict:
    """The flat dict the CLI prints: the first model row, its floor and the baseline."""
    floor, model, base = rows[0], rows[1], rows[-1]
    out: dict = {"model": model["name"]}
    for k in ("fid", "fid_low", "fid_high", "kid", "kid_low", "kid_high", "class_accuracy", "coverage",
              "nn_distance", "near_copies", "samples_per_s"):
        if k in model:
            out[k] = model[k]
    for k in ("fid", "kid", "class_accuracy", "coverage", "nn_distance"):
        if k in floor:
            out[f"floor_{k}"] = floor[k]
        if k in base:
            out[f"baseline_{k}"] = base[k]
    if "fid" in model and floor.get("fid"):
        out["fid_over_floor"] = model["fid"] / floor["fid"]
    for r in rows[2:-1]:
        if "DDPM" in r["name"]:
            out["ddpm_class_accuracy"] = r.get("class_accuracy")
            out["ddpm_samples_per_s"] = r.get("samples_per_s")
    return {k: v for k, v in out.items() if v is not None}


def save_grids(grids: dict[str, torch.Tensor], folder: Path, scale: int) -> dict[str, Path]:
    paths = {}
    for i, (name, images) in enumerate(grids.items()):
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        paths[name] = save_image_grid(images, folder / f"eval-{i}-{slug[:40]}.png", nrow=8, scale=scale)
    return paths


def _fmt(row: dict, key: str, scale: float = 1.0, digits: int = 3) -> str:
    if key not in row:
        return "—"
    v = row[key] * scale
    if f"{key}_low" in row:
        return f"{v:.{digits}g} [{row[key + '_low'] * scale:.{digits}g}, {row[key + '_high'] * scale:.{digits}g}]"
    return f"{v:.{digits}g}"


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]:.1f}%" if key in row else "—"


def write_evaluation_section(run: RunDir, out: dict, grids: dict[str, torch.Tensor], scale: int) -> None:
    rows = out["rows"]
    paths = save_grids(grids, run.plots_dir, scale)
    _plot_fid(rows, run.plots_dir / "eval-fid.png")
    lines = [
        "## Evaluation", "",
        f"Features: penultimate layer ({out['feature_dim']}-d) of the domain classifier in `classifier/` "
        f"(held-out accuracy {_pct(rows[0], 'class_accuracy')}). FID at n = {out['n_fid']} for every row "
        f"against the training images, 95% bootstrap intervals; KID (unbiased) on all samples. The "
        f"classifier was fitted on the training images, so their features are spread a little wider than "
        f"those of any fresh image: both FID and KID of fresh real images (the floor, first row) are offset "
        f"from 0 (KID can be below 0); compare a model with the floor. The first row is "
        f"the floor: real held-out images scored like samples. NN distance: median RMS pixel distance "
        f"to the nearest training image (memorisation; copies sit near 0); near-copies: share closer "
        f"than 99% of held-out images are.", "",
        "| set | n | FID | KID | class acc | coverage | NN dist | near-copies | samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sps = f"{r['samples_per_s']:.3g}" if "samples_per_s" in r else "—"
        lines.append(f"| {r['name']} | {r['n']} | {_fmt(r, 'fid')} | {_fmt(r, 'kid')} | "
                     f"{_pct(r, 'class_accuracy')} | {_pct(r, 'coverage')} | {r['nn_distance']:.3f} | "
                     f"{_pct(r, 'near_copies')} | {sps} |")
    s = out["summary"]
    if "fid_over_floor" in s:
        lines += ["", f"**{s['model']}**: FID {s['fid']:.3g} = {s['fid_over_floor']:.2f}x the floor "
                      f"({s['floor_fid']:.3g}); PCA+GMM baseline FID {s.get('baseline_fid', float('nan')):.3g}."]
    lines += ["", "![FID](plots/eval-fid.png)", ""]
    lines += [f"{name}: ![{name}](plots/{p.name})  " for name, p in paths.items()]
    update_report(run, "evaluation", "\n".join(lines))


def _plot_fid(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "fid" in r]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)), dpi=110)
    y = np.arange(len(rows))
    vals = [r["fid"] for r in rows]
    err = [[r["fid"] - r["fid_low"] for r in rows], [r["fid_high"] - r["fid"] for r in rows]]
    ax.barh(y, vals, xerr=np.clip(err, 0, None), color=["#888"] + ["#4a7"] * (len(rows) - 2) + ["#c84"])
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("FID (classifier features), 95% bootstrap interval")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
