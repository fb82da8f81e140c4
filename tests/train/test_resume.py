"""--resume continues the same training or refuses; checkpoints are data, never code."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import yaml

from genforge.cli import main
from genforge.common.errors import ConfigError, RunError
from genforge.common.runs import RunDir
from genforge.jobs.train import run_recipe
from genforge.train import checkpoint

STOP = 0.000001  # a time budget that stops a run after its first step (which is checkpointed)


@pytest.fixture
def stopped(tmp_path, char_dataset, tiny_recipe):
    """A recipe and its run, stopped (and checkpointed) after step 1."""
    recipe = tiny_recipe(tmp_path, char_dataset, max_steps=12, time_budget=STOP)
    run_recipe(recipe)
    return recipe, RunDir(tmp_path / "runs" / "r")


@pytest.mark.parametrize("override, field, old, new", [
    ("train.lr=0.002", "lr", "0.003", "0.002"),
    ("train.batch_size=4", "batch_size", "8", "4"),
    ("train.warmup_steps=2", "warmup_steps", "5", "2"),
    ("train.min_lr=0.0001", "min_lr", "None", "0.0001"),
    ("train.max_steps=20", "max_steps", "12", "20"),
    ("train.max_tokens=5000", "max_tokens", "None", "5000"),
    ("train.grad_accum=2", "grad_accum", "1", "2"),
    ("train.seed=8", "seed", "7", "8"),
])
def test_resume_refuses_a_changed_training_config(stopped, override, field, old, new):
    recipe, run = stopped
    before = run.recipe_path.read_bytes()
    with pytest.raises(ConfigError) as e:
        run_recipe(recipe, [override, "train.time_budget=null"], resume=True)
    msg = str(e.value)
    assert msg.startswith(f"train.{field} changed from {old} to {new} since the checkpoint at step 1")
    assert "\n" not in msg and e.value.param == f"train.{field}"
    # refused before anything was written
    assert run.recipe_path.read_bytes() == before and not run.segment_recipes()
    assert [p.name for p in run.checkpoints()] == ["step-1"]


@pytest.mark.parametrize("override, message", [
    ("model.dropout=0.1", "model.dropout changed from None to 0.1 since"),
    ("model.rope_theta=500", "model.rope_theta changed from None to 500 since"),
])
def test_resume_refuses_a_changed_model_section_outside_the_signature(stopped, override, message):
    recipe, run = stopped
    with pytest.raises(ConfigError, match=message):
        run_recipe(recipe, [override, "train.time_budget=null"], resume=True)
    assert not run.segment_recipes()


def test_cli_names_the_changed_field_on_one_line(stopped, capsys):
    recipe, _ = stopped
    code = main(["train", str(recipe), "--resume", "--set", "train.lr=0.002"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: train.lr changed from 0.003 to 0.002") and err.count("\n") == 1


def test_resume_may_change_time_budget_and_cadence_and_keeps_every_segments_recipe(stopped):
    recipe, run = stopped
    first = run.read_recipe()
    assert first["train"]["time_budget"] == STOP
    out = run_recipe(recipe, ["train.time_budget=3600", "train.eval_every=4", "train.log_every=3"], resume=True)
    assert out.result.steps == 12
    assert run.read_recipe() == first  # the original recipe.yaml is never overwritten
    [seg] = run.segment_recipes()
    assert seg.name == "recipe.segment-2.yaml"
    doc = yaml.safe_load(seg.read_text())
    assert doc["train"]["time_budget"] == 3600 and doc["train"]["eval_every"] == 4
    assert doc["_provenance"]["segment"] == 2 and doc["_provenance"]["resumed_from_step"] == 1
    run_recipe(recipe, ["train.time_budget=3600"], resume=True)  # a third segment (already finished)
    assert [p.name for p in run.segment_recipes()] == ["recipe.segment-2.yaml", "recipe.segment-3.yaml"]


class _Boom:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(stopped, tmp_path):
    recipe, run = stopped
    ckpt = run.latest_checkpoint()
    state = torch.load(ckpt / "state.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["rng"]["payload"] = _Boom(marker)
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(RunError, match="refused to load.*could run code") as e:
        run_recipe(recipe, ["train.time_budget=null"], resume=True)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_checkpoint_files_hold_only_tensors_and_json(stopped):
    _, run = stopped
    ckpt = run.latest_checkpoint()
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta.json", "state.pt"]
    torch.load(ckpt / "state.pt", weights_only=True)  # loads without allowing code
    meta = checkpoint.read_meta(ckpt)
    assert meta["step"] == 1 and meta["train"]["lr"] == 0.003 and "time_budget" not in meta["train"]


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    run = RunDir(tmp_path / "run").create()
    checkpoint.save(run, "step-1", {}, {"step": 1, "signature": {}, "train": {}, "best_val_loss": float("inf"),
                                        "elapsed": 0.0, "tokens": 0})
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    tensors, meta = checkpoint.load(run.checkpoints_dir / "step-1", torch.device("cpu"))
    checkpoint.set_rng_state(tensors["rng"], meta["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
    assert meta["best_val_loss"] == float("inf")


def test_stale_temporary_checkpoint_folders_are_removed(stopped):
    recipe, run = stopped
    stale = run.checkpoints_dir / ".step-5.tmp-deadbeef"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half")
    run_recipe(recipe, ["train.time_budget=null"], resume=True)
    assert not stale.exists()
    assert all(not p.name.startswith(".") for p in run.checkpoints_dir.iterdir())
