"""`genforge anomaly RUN IMAGES`: score images by a VAE run's negative ELBO.

Images far from what the VAE was trained on reconstruct badly and need unlikely latents, so
their negative ELBO is high. IMAGES is a prepared dataset folder (its val split is scored:
images the run never trained on) or a folder of images (class subfolders optional). When the
images carry class names and some of them are classes the run held out of training
(`data.exclude_classes`) or that `anomaly_classes` names, the AUROC of telling those from the
trained classes is computed with scikit-learn. Writes scores.csv, histogram.png and summary.json
into RUN/anomaly/ (or `out`) and the "anomaly" section of the run's report.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from genforge.common.errors import DataError, RunError
from genforge.common.runs import RunDir, atomic_dir, update_report
from genforge.data.images import ImageDataset, read_image_folder
from genforge.models.vae import ConvVAE, load_vae, per_image_losses

_OUTPUTS = {"scores.csv", "histogram.png", "summary.json"}


@torch.no_grad()
def score_tensor(model: ConvVAE, images: torch.Tensor, *, samples: int = 8, batch_size: int = 256,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Per-image negative ELBO (mean over `samples` posterior draws), its reconstruction and KL
    parts, and the reconstruction error at the posterior mean (MSE per pixel)."""
    model.eval()
    g = torch.Generator(device=model.device).manual_seed(seed)
    out: dict[str, list] = {"nelbo": [], "recon": [], "kl": [], "mse": []}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(model.device, model.dtype)
        recon = kl = 0.0
        for _ in range(samples):
            r, k = per_image_losses(model, x, g)
            recon, kl = recon + r / samples, kl + k / samples
        mu, _ = model.encode(x)
        mse = (model.decode(mu).float() - x.float()).pow(2).flatten(1).mean(1)
        for key, v in (("nelbo", recon + kl), ("recon", recon), ("kl", kl), ("mse", mse)):
            out[key].append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _load_images(images: str | Path, model: ConvVAE, split: str) -> tuple[torch.Tensor, list[str] | None, list]:
    """(images in [-1, 1], class name per image or None, file per image or index)."""
    path = Path(images)
    size, channels = model.config.sample_size, model.config.channels
    if (path / "stats.json").is_file():
        ds = ImageDataset(path)
        if (ds.size, ds.channels) != (size, channels):
            raise DataError(f"{path}: {ds.channels}x{ds.size}px images, the VAE takes {channels}x{size}px; "
                            f"prepare the dataset with --size {size}")
        if split == "all":
            x, y = ds.images, ds.labels
        else:
            x, y = ds.split(split)
        return x, [ds.classes[i] for i in y.tolist()], list(range(len(x)))
    if not path.is_dir():
        raise DataError(f"images not found: {path} (expected a dataset folder or a folder of images)")
    arr, labels, classes, info = read_image_folder(path, size=size, channels=channels)
    x = torch.from_numpy(arr).float().div(127.5).sub(1.0)
    loaded = [p for p in sorted(_files(path)) if p not in {s["file"] for s in info["skipped"]}]
    has_classes = any(d.is_dir() for d in path.iterdir())
    names = [classes[i] for i in labels.tolist()] if has_classes else None
    return x, names, loaded if len(loaded) == len(x) else list(range(len(x)))


def _files(path: Path) -> list[str]:
    from genforge.data.images import IMAGE_EXTENSIONS

    return [str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            and not p.name.startswith(".")]


def score_images(run: str | Path, images: str | Path, out: str | Path | None = None, *,
                 anomaly_classes: list[str] | None = None, split: str = "val", samples: int = 8) -> dict:
    """Score `images` with the VAE of `run`; returns the summary (AUROC when it can be computed)."""
    rd = RunDir.open(run)
    try:
        model, meta = load_vae(rd.path)
    except RunError as e:
        raise RunError(f"anomaly scoring needs a trained VAE run: {e.message}") from None
    if split not in ("train", "val", "all"):
        raise DataError(f"split {split!r}: use train, val or all")
    x, names, ids = _load_images(images, model, split)
    if len(x) == 0:
        raise DataError(f"{images}: no images to score in split {split!r}")
    s = score_tensor(model, x, samples=samples)
    trained = set(meta.get("classes") or []) - set(meta.get("exclude_classes") or [])
    held_out = list(anomaly_classes if anomaly_classes is not None else meta.get("exclude_classes") or [])
    summary: dict = {"run": str(rd.path), "images": str(images), "split": split, "num_images": len(x),
                     "score": "negative ELBO (nats, lower = more typical)", "samples": samples,
                     "mean_score": float(s["nelbo"].mean()), "median_score": float(np.median(s["nelbo"]))}
    is_anom = None
    if names is not None and held_out:
        unknown = sorted(set(held_out) - set(names) - trained)
        if unknown and anomaly_classes is not None:
            raise DataError(f"anomaly classes {unknown} are not among the image classes "
                            f"({', '.join(sorted(set(names)))})")
        is_anom = np.array([n in held_out for n in names])
        summary["anomaly_classes"] = held_out
        summary["num_anomalies"] = int(is_anom.sum())
        if 0 < is_anom.sum() < len(is_anom):
            from sklearn.metrics import roc_auc_score

            normal = s["nelbo"][~is_anom]
            threshold = float(np.percentile(normal, 95))
            summary.update({
                "auroc": float(roc_auc_score(is_anom, s["nelbo"])),
                "auroc_mse": float(roc_auc_score(is_anom, s["mse"])),
                "threshold_p95_normal": threshold,
                "anomalies_flagged_at_threshold": float((s["nelbo"][is_anom] > threshold).mean()),
                "mean_score_normal": float(normal.mean()),
                "mean_score_anomalies": float(s["nelbo"][is_anom].mean())})
        else:
            summary["auroc"] = None
            summary["auroc_note"] = "needs both held-out and trained classes among the images"
    dest = Path(out) if out is not None else rd.path / "anomaly"
    if dest.exists() and (not dest.is_dir() or any(p.name not in _OUTPUTS for p in dest.iterdir())):
        raise DataError(f"--out {dest} exists and holds other files; choose an empty or new folder")
    with atomic_dir(dest) as tmp:
        (tmp / "scores.csv").write_text(_csv(ids, names, s, is_anom), encoding="utf-8")
        _histogram(s["nelbo"], is_anom, held_out, tmp / "histogram.png", rd.path.name)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    summary["scores_csv"] = str(dest / "scores.csv")
    summary["histogram"] = str(dest / "histogram.png")
    update_report(rd, "anomaly", _report(summary, dest, rd.path))
    return summary


def _csv(ids: list, names: list[str] | None, s: dict[str, np.ndarray], is_anom: np.ndarray | None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "class", "held_out", "nelbo", "recon", "kl", "mse"])
    for i, ident in enumerate(ids):
        w.writerow([ident, names[i] if names else "", "" if is_anom is None else int(is_anom[i]),
                    f"{s['nelbo'][i]:.4f}", f"{s['recon'][i]:.4f}", f"{s['kl'][i]:.4f}", f"{s['mse'][i]:.6f}"])
    return buf.getvalue()


def _histogram(scores: np.ndarray, is_anom: np.ndarray | None, held_out: list[str], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = np.histogram_bin_edges(scores, bins=40)
    if is_anom is not None and is_anom.any() and (~is_anom).any():
        ax.hist(scores[~is_anom], bins=bins, alpha=0.6, density=True, label="trained classes")
        ax.hist(scores[is_anom], bins=bins, alpha=0.6, density=True, label=f"held out: {', '.join(held_out)}")
        ax.legend()
    else:
        ax.hist(scores, bins=bins, alpha=0.8)
    ax.set_xlabel("negative ELBO (nats, up to a constant)")
    ax.set_ylabel("density")
    ax.set_title(f"{title}: anomaly scores")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _report(summary: dict, dest: Path, run_path: Path) -> str:
    rel = lambda p: p.relative_to(run_path) if p.is_relative_to(run_path) else p  # noqa: E731
    lines = ["## Anomaly scoring", "",
             f"{summary['num_images']} images from `{summary['images']}` ({summary['split']} split) scored by "
             f"negative ELBO ({summary['samples']} posterior samples each); mean {summary['mean_score']:.2f} nats."]
    if summary.get("auroc") is not None:
        lines += ["", "| | |", "|---|---|",
                  f"| held-out classes | {', '.join(summary['anomaly_classes'])} ({summary['num_anomalies']} images) |",
                  f"| AUROC (negative ELBO) | {summary['auroc']:.3f} |",
                  f"| AUROC (reconstruction MSE) | {summary['auroc_mse']:.3f} |",
                  f"| mean score, trained / held-out | {summary['mean_score_normal']:.2f} / "
                  f"{summary['mean_score_anomalies']:.2f} |",
                  f"| held-out flagged at the 95th percentile of trained | "
                  f"{100 * summary['anomalies_flagged_at_threshold']:.1f}% |"]
    elif summary.get("auroc_note"):
        lines += ["", f"No AUROC: {summary['auroc_note']}."]
    lines += ["", f"Scores: `{rel(dest / 'scores.csv')}`", "", f"![anomaly scores]({rel(dest / 'histogram.png')})"]
    return "\n".join(lines)
