"""Anomaly scoring with a VAE run: a digit class held out of training is told apart by its ELBO."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from genforge.common.config import recipe_from_tree
from genforge.common.errors import DataError, RunError
from genforge.data.images import ImageDataset, prepare_image_dataset, to_uint8
from genforge.jobs.anomaly import score_images
from genforge.jobs.train import run_loaded_recipe

HELD_OUT = "0"


def _train_vae(dataset: Path, out: Path, steps: int, name: str = "vae"):
    tree = {"name": name, "family": "vae", "dataset": str(dataset), "out_dir": str(out),
            "model": {"latent_dim": 8, "block_out_channels": [16, 32]},
            "data": {"exclude_classes": [HELD_OUT]},
            "train": {"max_steps": steps, "batch_size": 64, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0,
                      "eval_every": steps, "eval_batches": 2, "log_every": 10, "checkpoint_every": steps,
                      "keep_last": 1, "seed": 0, "threads": 1}}
    return run_loaded_recipe(recipe_from_tree(tree)).run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomaly")
    prepare_image_dataset("builtin:digits", root / "digits8")
    return root, _train_vae(root / "digits8", root / "runs", 60)


def test_held_out_class_scores_higher(setup):
    root, run = setup
    result = score_images(run.path, root / "digits8")
    assert result["anomaly_classes"] == [HELD_OUT] and result["split"] == "val"
    assert 0 <= result["auroc"] <= 1 and 0 <= result["auroc_mse"] <= 1
    assert result["auroc"] > 0.6, result  # ~0.83 after 60 steps: well above chance
    assert result["mean_score_anomalies"] > result["mean_score_normal"]
    rows = list(csv.DictReader(Path(result["scores_csv"]).open()))
    assert len(rows) == result["num_images"] == ImageDataset(root / "digits8").stats["val_images"]
    assert {r["held_out"] for r in rows} == {"0", "1"}
    assert Path(result["histogram"]).is_file() and Path(result["histogram"]).parent == run.path / "anomaly"
    report = run.report_path.read_text()
    assert "## Anomaly scoring" in report and "AUROC (negative ELBO)" in report and "## Training" in report


def test_folder_of_images_and_out(setup, tmp_path: Path):
    root, run = setup
    ds = ImageDataset(root / "digits8")
    x, y = ds.split("val")
    for i in range(40):  # a folder of PNGs in class subfolders, as a user would have
        folder = tmp_path / "imgs" / ds.classes[int(y[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_uint8(x[i:i + 1])[0]).save(folder / f"{i}.png")
    result = score_images(run.path, tmp_path / "imgs", out=tmp_path / "scores")
    assert result["num_images"] == 40 and (tmp_path / "scores" / "scores.csv").is_file()
    assert json.loads((tmp_path / "scores" / "summary.json").read_text())["num_images"] == 40
    rows = list(csv.DictReader((tmp_path / "scores" / "scores.csv").open()))
    assert rows[0]["image"].endswith(".png")
    # asking for a class as anomalous: AUROC is computed against the others
    named = score_images(run.path, root / "digits8", out=tmp_path / "s2", anomaly_classes=["1"])
    assert named["anomaly_classes"] == ["1"] and 0 <= named["auroc"] <= 1


def test_anomaly_errors(setup, tmp_path: Path):
    root, run = setup
    with pytest.raises(RunError, match="not a genforge run"):
        score_images(tmp_path, root / "digits8")
    prepare_image_dataset("builtin:digits", tmp_path / "digits16", size=16)
    with pytest.raises(DataError, match="--size 8"):
        score_images(run.path, tmp_path / "digits16", out=tmp_path / "o")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds other files"):
        score_images(run.path, root / "digits8", out=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="not among"):
        score_images(run.path, root / "digits8", out=tmp_path / "o", anomaly_classes=["z"])


@pytest.mark.slow
def test_longer_training_separates_clearly(tmp_path: Path):
    prepare_image_dataset("builtin:digits", tmp_path / "digits8")
    run = _train_vae(tmp_path / "digits8", tmp_path / "runs", 400)
    result = score_images(run.path, tmp_path / "digits8")
    assert result["auroc"] > 0.9, result  # ~0.97
