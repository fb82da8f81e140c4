"""Progress bars, metrics.jsonl and plots: how long work shows itself to a person."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from genforge.common.runs import atomic_write_text

console = Console(stderr=True)


def progress_bar(transient: bool = False) -> Progress:
    """A rich progress bar: description, bar, n/total, elapsed, remaining, and a free-text field."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=transient)


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per logged step or eval."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log matches the run."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half line a killed run was writing
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line)
        # Written beside and renamed, so a crash here leaves the old log or the new one, never half.
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))


def plot_curves(rows: Sequence[dict], keys: Sequence[str], path: str | Path, title: str = "",
                x: str = "step", logy: bool = False) -> Path | None:
    """Plot `keys` against `x` from metrics rows into a PNG; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    plotted = False
    for key in keys:
        pts = [(r[x], r[key]) for r in rows if key in r and x in r and r[key] is not None
               and math.isfinite(float(r[key]))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="o" if len(pts) < 30 else None, markersize=3)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel(x)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
