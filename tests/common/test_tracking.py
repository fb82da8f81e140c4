"""TensorBoard event files and MLflow runs written beside metrics.jsonl, read back by their own readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import SummaryWriter

from genforge.common.runs import RunDir
from genforge.common.tracking import TrackedMetrics, event_files, read_scalars
from genforge.jobs.train import run_recipe


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard reads from the folder: every file, in its order, nothing purged (so a
    duplicated step would show)."""
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}, purge_orphaned_data=False).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in run.read_metrics():
        for k, v in row.items():
            if k != "step":
                out.setdefault(k, []).append((row["step"], v))
    return out


def assert_same_scalars(tb: dict, jsonl: dict) -> None:
    assert set(tb) == set(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        # TensorBoard stores float32
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-30), tag


def test_training_writes_every_logged_scalar_to_tensorboard(tmp_path, char_dataset, tiny_recipe):
    run = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=20)).run
    jsonl = jsonl_scalars(run)
    assert {"loss", "lr", "grad_norm", "elapsed", "tokens_per_s", "val_loss"} <= set(jsonl)
    assert [s for s, _ in jsonl["loss"]] == [5, 10, 15, 20] and [s for s, _ in jsonl["val_loss"]] == [10, 20]
    assert len(event_files(run.path / "tb")) == 1
    assert_same_scalars(tensorboard_scalars(run.path / "tb"), jsonl)


def test_resume_continues_the_event_log_without_repeating_steps(tmp_path, char_dataset, tiny_recipe):
    recipe = tiny_recipe(tmp_path, char_dataset, max_steps=20, keep_last=5)
    run = run_recipe(recipe).run
    first = tensorboard_scalars(run.path / "tb")
    # As if the process died after logging steps 15 and 20 but before checkpointing step 20.
    shutil.rmtree(run.checkpoints_dir / "step-20")
    with open(event_files(run.path / "tb")[0], "ab") as f:
        f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00half")  # the record a killed writer was cutting
    run_recipe(recipe, resume=True)
    files = event_files(run.path / "tb")
    assert len(files) == 2  # the first file cut back to step 10, a new one for the resumed segment
    assert max(step for _, step, _ in read_scalars(files[0])) == 10
    assert min(step for _, step, _ in read_scalars(files[1])) == 15
    resumed = tensorboard_scalars(run.path / "tb")
    assert_same_scalars(resumed, jsonl_scalars(run))
    # resume is exact: the losses TensorBoard shows are the ones of the uninterrupted run
    assert [s for s, _ in resumed["loss"]] == [s for s, _ in first["loss"]] == [5, 10, 15, 20]
    assert [v for _, v in resumed["loss"]] == pytest.approx([v for _, v in first["loss"]])


def test_a_fresh_run_starts_a_fresh_event_log(tmp_path):
    run = RunDir(tmp_path / "r").create()
    old = SummaryWriter(str(run.path / "tb"))
    old.add_scalar("loss", 9.0, 99)
    old.close()
    metrics = TrackedMetrics(run)
    metrics.reset()
    metrics.log({"step": 1, "loss": 2.0, "note": "text is not a scalar", "flag": True})
    metrics.close()
    assert [read_scalars(p) for p in event_files(run.path / "tb")] == [[("loss", 1, 2.0)]]


def test_mlflow_gets_the_recipe_metrics_and_report(tmp_path, char_dataset, tiny_recipe, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database or a server otherwise
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    run = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=10)).run
    ref = json.loads((run.path / "mlflow.json").read_text())
    client = mlflow.MlflowClient(ref["tracking_uri"])
    remote = client.get_run(ref["run_id"])
    assert remote.info.status == "FINISHED" and remote.info.run_name == "r"
    assert client.get_experiment(remote.info.experiment_id).name == "tracking-test"
    assert remote.data.params["family"] == "lm" and remote.data.params["train.max_steps"] == "10"
    assert remote.data.params["model.hidden_size"] == "32"
    for key, points in jsonl_scalars(run).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(ref["run_id"], key))
        assert [s for s, _ in history] == [s for s, _ in points], key
        assert [v for _, v in history] == pytest.approx([v for _, v in points]), key
    artifacts = {a.path for a in client.list_artifacts(ref["run_id"])}
    assert {"report.md", "recipe.yaml", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(ref["run_id"], "plots")] == ["plots/loss.png"]


def test_an_unreachable_mlflow_server_does_not_stop_training(tmp_path, char_dataset, tiny_recipe, monkeypatch,
                                                             capsys):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    out = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=5, eval_every=5))
    assert out.result.steps == 5 and out.run.model_dir.is_dir()
    assert "MLflow logging off for this run" in capsys.readouterr().err
    assert not (out.run.path / "mlflow.json").exists()
