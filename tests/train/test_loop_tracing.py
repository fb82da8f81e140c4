"""`genforge train --trace console`: the loop's spans, read back from the console exporter's JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")
ROOT = Path(__file__).resolve().parents[2]


def test_a_training_run_is_one_trace_of_data_steps_evals_and_checkpoints(char_dataset, tmp_path, tiny_recipe):
    recipe = tiny_recipe(tmp_path, char_dataset, max_steps=6, eval_every=3, checkpoint_every=3,
                              log_every=3, eval_batches=2, grad_accum=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "genforge.cli", "train", str(recipe), "--trace", "console"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    spans = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"name"')]
    by_id = {s["context"]["span_id"]: s for s in spans}
    (root,) = [s for s in spans if s["parent_id"] is None]
    assert root["name"] == "train" and root["attributes"]["genforge.run"] == "r"
    assert root["resource"]["attributes"]["service.name"] == "genforge"
    assert {s["context"]["trace_id"] for s in spans} == {root["context"]["trace_id"]}

    def parent(s):
        return by_id[s["parent_id"]]["name"]

    steps = [s for s in spans if s["name"] == "step"]
    assert sorted(s["attributes"]["genforge.step"] for s in steps) == [1, 2, 3, 4, 5, 6]
    assert all(parent(s) == "train" for s in steps)
    data_per_step = Counter(by_id[s["parent_id"]]["attributes"]["genforge.step"] for s in spans if s["name"] == "data")
    assert data_per_step == {n: 2 for n in range(1, 7)}  # one per micro-batch (grad_accum 2)
    assert sorted(s["attributes"]["genforge.step"] for s in spans if s["name"] == "eval") == [3, 6]
    checkpoints = [s for s in spans if s["name"] == "checkpoint"]
    assert sorted(s["attributes"]["genforge.step"] for s in checkpoints) == [3, 6]
    assert all(parent(s) == "train" for s in checkpoints)
