"""Looking across runs: `genforge runs list`, `genforge runs compare` and `genforge report --html`.

Everything here only reads run directories (recipe.yaml, metrics.jsonl, checkpoints/*/meta.json,
report.md, plots/, samples/) and writes a PNG or an HTML file; nothing trains.
"""

from __future__ import annotations

import base64
import html
import json
import math
import mimetypes
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.table import Table

from genforge.common.errors import RunError
from genforge.common.runs import RunDir, atomic_write_text

_MAX_DEPTH = 3  # runs/<name>/ and runs/<job>/<name>/ (demo --finetune nests its sft and dpo runs)


@dataclass
class RunSummary:
    path: Path
    family: str
    steps: int
    best_val_loss: float | None
    wall_time: float | None
    dataset: str
    created: float  # when recipe.yaml was written: a fresh start writes it, a resume never does


def find_runs(root: str | Path) -> list[RunDir]:
    """Run directories (folders with a recipe.yaml) under `root`, not descending into a run."""
    root = Path(root)
    if not root.is_dir():
        raise RunError(f"runs folder not found: {root} (train a recipe with `genforge train`, or name the "
                       "folder that holds the runs)")
    if (root / "recipe.yaml").is_file():
        return [RunDir(root)]
    found: list[RunDir] = []

    def walk(folder: Path, depth: int) -> None:
        for child in sorted(folder.iterdir()):
            if not child.is_dir() or child.name.startswith("."):
                continue
            if (child / "recipe.yaml").is_file():
                found.append(RunDir(child))
            elif depth < _MAX_DEPTH:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def summarize(run: RunDir) -> RunSummary:
    """What a run did, from metrics.jsonl, falling back on its latest checkpoint's meta.json."""
    recipe = run.read_recipe() or {}
    rows = run.read_metrics()
    steps = max((int(r["step"]) for r in rows if isinstance(r.get("step"), (int, float))), default=0)
    vals = [float(r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))
            and math.isfinite(r["val_loss"])]
    elapsed = [float(r["elapsed"]) for r in rows if isinstance(r.get("elapsed"), (int, float))]
    best, wall = (min(vals) if vals else None), (elapsed[-1] if elapsed else None)
    latest = run.latest_checkpoint()
    if latest is not None and (not rows or best is None or wall is None):
        try:  # meta.json read as plain JSON: listing runs should not import torch
            meta = json.loads((latest / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        steps = max(steps, int(meta.get("step", 0)))
        if best is None and isinstance(meta.get("best_val_loss"), (int, float)):
            best = float(meta["best_val_loss"])
        wall = wall if wall is not None else meta.get("elapsed")
    return RunSummary(path=run.path, family=str(recipe.get("family", "?")), steps=steps, best_val_loss=best,
                      wall_time=wall, dataset=_short_path(str(recipe.get("dataset", ""))),
                      created=run.recipe_path.stat().st_mtime)


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    """Every run under `root`, oldest first."""
    summaries = []
    for run in find_runs(root):
        try:
            summaries.append(summarize(run))
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue  # a recipe.yaml that is not a genforge recipe: not a run
    return sorted(summaries, key=lambda s: s.created)


def runs_table(summaries: Sequence[RunSummary], root: str | Path) -> Table:
    table = Table(title=f"runs in {root}")
    for name, justify in (("name", "left"), ("family", "left"), ("steps", "right"), ("best val loss", "right"),
                          ("wall time", "right"), ("dataset", "left"), ("created", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    root = Path(root)
    for s in summaries:
        name = str(s.path.relative_to(root)) if s.path.is_relative_to(root) and s.path != root else s.path.name
        table.add_row(name, s.family, str(s.steps), _num(s.best_val_loss), _duration(s.wall_time), s.dataset,
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created)))
    return table


# --- compare -------------------------------------------------------------------------------------

_LOWER_BETTER = ("loss", "ppl", "perplexity", "bpb", "fid", "kid")
_HIGHER_BETTER = ("acc", "accuracy", "margin", "tokens_per_s")
_NOT_METRICS = {"step"}


@dataclass
class Comparison:
    names: list[str]
    table: dict[str, list[tuple[float, float | None]]]  # metric -> per run (final, best or None)
    plot: Path


def resolve_run(path: str | Path, runs_root: str | Path = "runs") -> RunDir:
    """A run directory given as a path, or as a name under runs/."""
    p = Path(path)
    if not p.exists() and (Path(runs_root) / p).is_dir():
        p = Path(runs_root) / p
    return RunDir.open(p)


def _numeric_keys(rows: list[dict]) -> set[str]:
    return {k for r in rows for k, v in r.items()
            if k not in _NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _best(key: str, values: list[float]) -> float | None:
    if any(word in key for word in _LOWER_BETTER):
        return min(values)
    if any(word in key for word in _HIGHER_BETTER):
        return max(values)
    return None  # lr, grad_norm, elapsed: no better direction


def compare_runs(paths: Sequence[str | Path], out: str | Path | None = None) -> Comparison:
    """Final and best value of each metric the runs share, and their loss curves overlaid in one PNG."""
    if len(paths) < 2:
        raise RunError("runs compare needs at least two runs (genforge runs compare RUN_A RUN_B ...)")
    runs = [resolve_run(p) for p in paths]
    names = _distinct_names(runs)
    metrics = []
    for run in runs:
        rows = run.read_metrics()
        if not rows:
            raise RunError(f"{run.path}: no metrics.jsonl rows; the run has not logged a step yet")
        metrics.append(rows)
    shared = set.intersection(*(_numeric_keys(rows) for rows in metrics))
    if not shared:
        has = "; ".join(f"{n}: {', '.join(sorted(_numeric_keys(r))) or 'nothing'}" for n, r in zip(names, metrics))
        raise RunError(f"the runs share no metric to compare ({has}); compare runs of the same family")
    order = sorted(shared, key=lambda k: ({"loss": 0, "val_loss": 1}.get(k, 2 if k.startswith("val_") else 3), k))
    table = {}
    for key in order:
        per_run = []
        for rows in metrics:
            values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            per_run.append((values[-1] if values else math.nan, _best(key, values) if values else None))
        table[key] = per_run
    plot_keys = [k for k in ("loss", "val_loss") if k in shared] or \
        [k for k in order if "loss" in k][:2] or order[:2]
    default = runs[0].path.parent / f"compare-{'-'.join(n.replace('/', '_') for n in names)}.png"
    plot = _plot_overlay(names, metrics, plot_keys, Path(out) if out is not None else default)
    return Comparison(names=names, table=table, plot=plot)


def comparison_table(c: Comparison) -> Table:
    table = Table(title="final (best)")
    table.add_column("metric", overflow="fold")
    for name in c.names:
        table.add_column(name, justify="right", overflow="fold")
    for key, per_run in c.table.items():
        table.add_row(key, *(_num(final) + (f" ({_num(best)})" if best is not None else "")
                             for final, best in per_run))
    return table


def _distinct_names(runs: Sequence[RunDir]) -> list[str]:
    names = [r.path.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.path.parent.name}/{r.path.name}" for r in runs]


def _plot_overlay(names: Sequence[str], metrics: Sequence[list[dict]], keys: Sequence[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), dpi=110, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        for i, (name, rows) in enumerate(zip(names, metrics)):
            pts = [(r["step"], float(r[key])) for r in rows if "step" in r and isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, color=colours[i % len(colours)],
                        marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return out


# --- report.md as one self-contained HTML file ---------------------------------------------------

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")
_IMG_TAG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
_SRC = re.compile(r"""\bsrc\s*=\s*("([^"]*)"|'([^']*)')""", re.IGNORECASE)
_ALT = re.compile(r"""\balt\s*=\s*("([^"]*)"|'([^']*)')""", re.IGNORECASE)
_STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem}
img{max-width:100%}pre{background:#f5f5f5;padding:.75rem;overflow-x:auto}code{font-size:90%}
figure{display:inline-block;margin:.5rem}figcaption{font-size:85%;color:#555}"""


def render_report_html(run_path: str | Path, out: str | Path | None = None) -> Path:
    """report.md of a run, its images and the plots and samples it does not show, as one HTML file
    that needs nothing else: images are embedded as data: URIs, the style is inline."""
    from markdown_it import MarkdownIt

    folder = Path(run_path)
    if not folder.is_dir():
        raise RunError(f"run directory not found: {folder}")
    report = folder / "report.md"
    if not report.is_file():
        raise RunError(f"{folder} has no report.md; `genforge train` writes one (and eval adds to it)")
    md = MarkdownIt("commonmark", {"html": True}).enable("table")
    embedded: set[Path] = set()
    body = _IMG_TAG.sub(lambda m: _embed_img(m.group(0), folder, embedded), md.render(report.read_text("utf-8")))
    extra = [p for d in ("plots", "samples") if (folder / d).is_dir() for p in sorted((folder / d).rglob("*"))
             if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file() and p.resolve() not in embedded]
    if extra:
        body += "<h2>Plots and samples</h2>\n" + "".join(
            f'<figure><img src="{_data_uri(p)}" alt="{html.escape(p.name)}">'
            f"<figcaption>{html.escape(str(p.relative_to(folder)))}</figcaption></figure>\n" for p in extra)
    title = html.escape(folder.resolve().name)
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
    dest = Path(out) if out is not None else folder / "report.html"
    atomic_write_text(dest, page)
    return dest


def _embed_img(tag: str, folder: Path, embedded: set[Path]) -> str:
    """An <img> with its local file inlined; one whose file is missing, outside the run, or
    remote becomes its alt text, so the page never fetches anything."""
    src_match = _SRC.search(tag)
    src = html.unescape((src_match.group(2) or src_match.group(3) or "") if src_match else "")
    if src.startswith("data:"):
        return tag
    alt_match = _ALT.search(tag)
    alt = (alt_match.group(2) or alt_match.group(3) or "") if alt_match else ""
    path = (folder / src).resolve() if src and "://" not in src and not src.startswith("//") else None
    if path is None or not path.is_file() or not path.is_relative_to(folder.resolve()):
        return f"<em>[image not embedded: {html.escape(alt or src)}]</em>"
    embedded.add(path)
    return tag[:src_match.start()] + f'src="{_data_uri(path)}"' + tag[src_match.end():]


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# --- formatting ----------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _short_path(p: str) -> str:
    """The last two parts of a long dataset path (the table is read, not copied)."""
    parts = Path(p).parts
    return p if len(p) <= 40 or len(parts) <= 2 else str(Path("…", *parts[-2:]))
