"""Checkpoints that cannot run code, and the checks that make a resume exact.

    checkpoints/step-N/ state.pt    tensors only: modules, optimizers, EMA, grad scaler, torch RNG (of
                                    every rank, when several processes trained: train/distributed.py);
                                    read with torch.load(weights_only=True), so a checkpoint from
                                    elsewhere is data, never code
                        meta.json   step, model signature, the training recipe, best val loss,
                                    elapsed time, tokens, Python and NumPy RNG states (plain lists)

Each folder is written to a temporary sibling and renamed (`atomic_dir`); a process killed
mid-write leaves only a dot-named temporary folder, which the next run removes.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genforge.common.config import RESUME_MAY_CHANGE, TrainConfig, to_dict
from genforge.common.errors import ConfigError, RunError
from genforge.common.runs import RunDir, atomic_dir, atomic_write_text

FORMAT = 1
STATE_FILE, META_FILE = "state.pt", "meta.json"


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), so saved and live values compare equal."""
    return json.loads(json.dumps(value, default=str))


def training_recipe(cfg: TrainConfig) -> dict:
    """The settings that decide the training trajectory; a resume must not change any of them."""
    return _plain({k: v for k, v in to_dict(cfg).items() if k not in RESUME_MAY_CHANGE})


def rng_state() -> tuple[dict, dict]:
    """(tensors, plain data) of every RNG the loop and the families draw from."""
    version, mt, gauss = random.getstate()
    key, np_mt, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(mt), gauss],
             "numpy": {"key": key, "mt": np_mt.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return tensors, plain


def set_rng_state(tensors: dict, plain: dict) -> None:
    version, mt, gauss = plain["python"]
    random.setstate((version, tuple(mt), gauss))
    n = plain["numpy"]
    np.random.set_state((n["key"], np.asarray(n["mt"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(tensors["torch"].cpu())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in tensors["cuda"]])


def save(run: RunDir, name: str, tensors: dict, meta: dict, rngs: list[tuple[dict, dict]] | None = None) -> None:
    """`rngs`: every rank's `rng_state()` when several processes train (rank 0's is kept as "rng", the
    others' as "rng_ranks"); this process's own by default."""
    (rng_tensors, rng_plain), *others = rngs or [rng_state()]
    with atomic_dir(run.checkpoints_dir / name) as tmp:
        extra = {"rng_ranks": [t for t, _ in others]} if others else {}
        torch.save({**tensors, "rng": rng_tensors, **extra}, tmp / STATE_FILE)
        best = meta.get("best_val_loss")
        meta = {"format": FORMAT, **meta, "rng": rng_plain,
                "best_val_loss": None if best is None or math.isinf(best) else best}
        if others:
            meta["rng_ranks"] = [p for _, p in others]
        atomic_write_text(tmp / META_FILE, json.dumps(_plain(meta), indent=1) + "\n")


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: no {META_FILE}; the checkpoint was written by an older genforge and "
                       "cannot be resumed, train under a new name") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path / META_FILE}: unreadable ({e}); the checkpoint is damaged") from None
    if meta.get("best_val_loss") is None:
        meta["best_val_loss"] = math.inf
    return meta


def load(path: Path, device: torch.device) -> tuple[dict, dict]:
    """(tensors, meta) of one checkpoint; refuses a state.pt holding anything but tensors and plain data."""
    meta = read_meta(path)
    try:
        tensors = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path / STATE_FILE}: refused to load: it holds objects other than tensors and plain "
                       f"data, and loading them could run code ({first[:160]}); use a checkpoint written by "
                       "genforge") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise RunError(f"{path / STATE_FILE}: unreadable ({str(e).splitlines()[0][:160]}); the checkpoint "
                       "is damaged") from None
    return tensors, meta


def check_same_training(saved: dict, cfg: TrainConfig, step: int) -> None:
    """Refuse a resume whose training recipe differs from the checkpoint's (it would not be exact)."""
    now = training_recipe(cfg)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if changed:
        what = ", ".join(f"train.{k} changed from {saved.get(k)!r} to {now.get(k)!r}" for k in changed)
        first = changed[0]
        raise ConfigError(f"{what} since the checkpoint at step {step}; a resume continues the same training "
                          f"(only {', '.join(sorted(RESUME_MAY_CHANGE))} may change): set it back "
                          f"(--set train.{first}={json.dumps(saved.get(first))}) or train under a new name",
                          param=f"train.{first}")


def check_same_model(saved: dict, signature: dict, run: RunDir) -> None:
    now = _plain(signature)
    if saved != now:
        keys = sorted(set(saved) | set(now))
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k))
        raise RunError(f"--resume: {run.path} was trained with a different model config "
                       f"({diff[:300] or 'unknown difference'}); use a new run name")


def resume_point(run: RunDir, cfg: TrainConfig) -> Path:
    """The checkpoint to resume from; refuses a run without one or a changed training recipe."""
    path = run.latest_checkpoint()
    if path is None:
        raise RunError(f"--resume: {run.path} has no checkpoint to resume from")
    meta = read_meta(path)
    check_same_training(meta.get("train", {}), cfg, meta["step"])
    return path


def remove_stale_temps(run: RunDir) -> None:
    """Temporary folders of a process killed while writing a checkpoint (never a complete one)."""
    if run.checkpoints_dir.is_dir():
        for p in run.checkpoints_dir.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def prune(run: RunDir, keep_last: int) -> None:
    for old in run.checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
