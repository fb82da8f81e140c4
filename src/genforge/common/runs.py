"""The run directory and atomic writes.

    runs/<name>/ recipe.yaml model/ adapters/<name>/ checkpoints/step-N/ metrics.jsonl
                 samples/ plots/ report.md

recipe.yaml is the recipe the run was started with and is never overwritten by a resume: each
`--resume` adds recipe.segment-N.yaml (N = 2, 3, ...) holding the recipe of that segment (only
the settings a resume may change, such as train.time_budget, can differ) and the step it
continued from.

Everything that must never be left half-written (checkpoints, model folders, indexes) is
written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import yaml

from genforge.common.errors import RunError

_PACKAGES = ("genforge", "torch", "transformers", "tokenizers", "diffusers", "peft", "numpy")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; reports and recipes are for others to read too
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info() -> dict:
    """Package versions, Python, platform and git commit, recorded with every run."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": versions, "git_commit": git_commit()}


class RunDir:
    """Paths of one run, and the few operations on them that several layers share."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    recipe_path = property(lambda self: self.path / "recipe.yaml")
    model_dir = property(lambda self: self.path / "model")
    adapters_dir = property(lambda self: self.path / "adapters")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_dir = property(lambda self: self.path / "samples")
    plots_dir = property(lambda self: self.path / "plots")
    report_path = property(lambda self: self.path / "report.md")

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run; a clear error if `path` is not one."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"run directory not found: {run.path}")
        if not run.recipe_path.is_file():
            raise RunError(f"{run.path} is not a genforge run (no recipe.yaml); train one with `genforge train`")
        return run

    def create(self) -> RunDir:
        for d in (self.path, self.samples_dir, self.plots_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def write_recipe(self, recipe_tree: dict, extra: dict | None = None, resumed_from: int | None = None) -> Path:
        """Record the recipe of a fresh run (recipe.yaml) or of a resumed segment (recipe.segment-N.yaml)."""
        doc = dict(recipe_tree)
        doc["_provenance"] = {**environment_info(), **(extra or {})}
        if resumed_from is None or not self.recipe_path.is_file():
            # A fresh start: segments of an abandoned earlier attempt no longer describe this run.
            for old in self.segment_recipes():
                old.unlink()
            path = self.recipe_path
        else:
            n = len(self.segment_recipes()) + 2
            doc["_provenance"].update(segment=n, resumed_from_step=resumed_from)
            path = self.path / f"recipe.segment-{n}.yaml"
        atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
        return path

    def segment_recipes(self) -> list[Path]:
        """recipe.segment-N.yaml of every resumed segment, in order."""
        found = self.path.glob("recipe.segment-*.yaml") if self.path.is_dir() else []
        return sorted(found, key=lambda p: int(p.stem.rsplit("-", 1)[1]))

    def read_recipe(self) -> dict:
        return yaml.safe_load(self.recipe_path.read_text(encoding="utf-8"))

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp folders are never listed)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step-")]
        return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
        return rows


_SECTION = "<!-- genforge:section {} -->"
_ORDER = ("header", "training", "evaluation", "samples")


def update_report(run: RunDir, section: str, markdown: str) -> None:
    """Replace (or add) one named section of report.md, keeping the others.

    Training, evaluation and sampling each own a section, so any of them can be re-run without
    losing what the others wrote.
    """
    sections: dict[str, str] = {}
    if run.report_path.is_file():
        current, name = None, None
        for line in run.report_path.read_text(encoding="utf-8").splitlines(keepends=True):
            if line.startswith("<!-- genforge:section ") and line.rstrip().endswith("-->"):
                name = line.strip()[len("<!-- genforge:section "):-len(" -->")]
                sections[name] = ""
                current = name
            elif current is not None:
                sections[current] += line
    sections[section] = markdown.rstrip() + "\n\n"
    names = [n for n in _ORDER if n in sections] + [n for n in sections if n not in _ORDER]
    text = "".join(_SECTION.format(n) + "\n" + sections[n] for n in names)
    atomic_write_text(run.report_path, text)
