"""The state-space preset in the training loop: its recipe's options are checked, and a resume
refuses a changed SSM state size (the model signature covers it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from genforge.cli import main
from genforge.common.errors import RunError
from genforge.jobs.train import run_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def mamba_overrides(tmp_path: Path, dataset: Path, **extra: str) -> list[str]:
    sets = {"dataset": str(dataset), "out_dir": str(tmp_path / "runs"), "model.hidden_size": "32",
            "model.num_layers": "1", "model.context_length": "32", "model.state_size": "8", "train.max_steps": "4",
            "train.batch_size": "4", "train.warmup_steps": "1", "train.eval_every": "4", "train.eval_batches": "1",
            "train.checkpoint_every": "2", "train.device": "cpu", **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def test_resume_refuses_a_changed_state_size_and_continues_an_unchanged_run(tmp_path, char_dataset):
    recipe = CONFIGS / "lm-mamba-tiny.yaml"
    # stopped after its step-2 checkpoint (a time budget cuts a run short; it may change on resume)
    first = run_recipe(recipe, mamba_overrides(tmp_path, char_dataset, **{"train.time_budget": "0.001"}))
    assert first.result.stopped_early and first.run.latest_checkpoint() is not None
    with pytest.raises(RunError, match="different model config.*state_size: 8 -> 16"):
        run_recipe(recipe, mamba_overrides(tmp_path, char_dataset, **{"model.state_size": "16"}), resume=True)
    resumed = run_recipe(recipe, mamba_overrides(tmp_path, char_dataset), resume=True)
    assert resumed.result.steps == 4


def test_state_space_preset_refuses_attention_options(tmp_path, char_dataset, capsys):
    code = main(["train", str(CONFIGS / "lm-mamba-tiny.yaml"), "--set", f"dataset={char_dataset}",
                 "--set", f"out_dir={tmp_path / 'runs'}", "--set", "model.num_heads=4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model.num_heads: preset lm-mamba-tiny is a state-space model" in err
