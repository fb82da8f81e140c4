import json
import math

import pytest
import yaml

from genforge.cli import main
from genforge.common.errors import RunError
from genforge.eval.lm import evaluate_run
from genforge.jobs.train import run_recipe


def test_eval_reports_loss_perplexity_and_bits_per_byte(tmp_path, char_dataset, tiny_recipe, capsys):
    run = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=30)).run
    result = evaluate_run(str(run.path))
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    stats = json.loads((char_dataset / "stats.json").read_text())
    per_byte = stats["tokens"]["val"] / stats["bytes"]["val"]
    assert result["bits_per_byte"] == pytest.approx(result["val_loss"] * per_byte / math.log(2))
    # A 30-step char model is far better than uniform over its vocabulary but not perfect.
    assert 0.5 < result["val_loss"] < math.log(stats["vocab_size"])
    assert json.loads((run.path / "eval.json").read_text())["val_loss"] == pytest.approx(result["val_loss"])
    assert "## Evaluation" in run.report_path.read_text() and "## Training" in run.report_path.read_text()
    assert main(["eval", str(run.path), "--max-batches", "2"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out


def test_eval_errors(tmp_path, char_dataset, tiny_recipe, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    run = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=5, name="e")).run
    recipe = run.read_recipe()
    recipe["_provenance"]["dataset"]["content_hash"] = "0" * 64
    run.recipe_path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RunError, match="changed since"):
        evaluate_run(str(run.path))
