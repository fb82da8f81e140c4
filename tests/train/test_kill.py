"""A training run killed with SIGKILL at a random moment resumes as if it had never stopped."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genforge.common.runs import RunDir
from genforge.jobs.train import run_recipe
from genforge.train import checkpoint

pytestmark = pytest.mark.slow


def _train_cmd(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "genforge.cli", "train", str(recipe), *extra]


def _rows(run: RunDir) -> list[dict]:
    """metrics.jsonl as written, tolerating only a half line at the very end (a kill mid-write)."""
    lines = run.metrics_path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"line {i + 1} of {len(lines)} is damaged: {line!r}"
    return rows


def _last_step(run: RunDir) -> int:
    try:
        tail = run.metrics_path.read_bytes()[-400:].decode("utf-8", "replace").split("\n")
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _train_losses(rows: list[dict]) -> dict[int, float]:
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sigkill_at_a_random_moment_then_resume_loses_nothing(tmp_path, char_dataset, tiny_recipe):
    steps = 300
    train = dict(max_steps=steps, log_every=1, checkpoint_every=5, keep_last=2, eval_every=50, eval_batches=2,
                 threads=1)
    whole = run_recipe(tiny_recipe(tmp_path, char_dataset, name="whole", **train)).run
    expected = _train_losses(whole.read_metrics())
    assert sorted(expected) == list(range(1, steps + 1))

    recipe = tiny_recipe(tmp_path, char_dataset, name="killed", **train)
    run = RunDir(tmp_path / "runs" / "killed")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        # a random moment after the first checkpoint: past a random step, plus a random fraction of a step
        rs = random.Random()
        target, jitter = rs.randint(6, steps - 60), rs.uniform(0.0, 0.02)
        deadline = time.monotonic() + 120
        while _last_step(run) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert run.checkpoints(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint"
        time.sleep(jitter)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    last = run.latest_checkpoint()
    k = int(last.name.split("-")[1])
    assert 0 < k < steps, (k, target, jitter)
    tensors, meta = checkpoint.load(last, torch.device("cpu"))  # the last checkpoint is complete
    assert meta["step"] == k and set(tensors) >= {"modules", "optimizers", "rng"}
    assert not run.model_dir.exists()  # killed before the end: no exported model
    before = [r for r in _rows(run) if r["step"] <= k]

    done = subprocess.run(_train_cmd(recipe, "--resume"), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    # nothing up to the last checkpoint was lost or changed, and nothing half-written is left
    rows = _rows(run)
    assert [r for r in rows if r["step"] <= k] == before
    assert not [p.name for p in run.checkpoints_dir.iterdir() if p.name.startswith(".")]
    assert [p.name for p in run.checkpoints()] == [f"step-{steps - 5}", f"step-{steps}"]
    assert (run.model_dir / "model.safetensors").is_file()
    # the per-step training losses are exactly those of the run that was never interrupted
    assert _train_losses(rows) == expected
    assert {r["step"]: r["val_loss"] for r in rows if "val_loss" in r} == \
        {r["step"]: r["val_loss"] for r in whole.read_metrics() if "val_loss" in r}
