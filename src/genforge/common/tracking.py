"""Experiment tracking: every metrics.jsonl row also goes to TensorBoard and, when asked, MLflow.

    runs/<name>/tb/events.out.tfevents.*   TensorBoard event files (`tensorboard --logdir runs`),
                                           one scalar per logged key at its step (tensorboardX:
                                           the `track` extra)
    runs/<name>/mlflow.json                the MLflow run this run logs to, so a resume continues it

MLflow is used when the `mlflow` extra is installed and MLFLOW_TRACKING_URI is set: the resolved
recipe as params, the metrics at their steps, and (from `log_artifacts`, after the report is
written) report.md, recipe.yaml and plots/ as artifacts. MLFLOW_EXPERIMENT_NAME picks the
experiment (default "genforge"). A tracking server that fails never stops training: the failure is
printed once and MLflow logging is switched off for the rest of the run.

Resume: `truncate_after(step)` drops the rows after the checkpoint from metrics.jsonl and the
same events from the event files (each rewritten beside itself and renamed, like the jsonl), and
the resumed segment writes a new event file; TensorBoard reads all files of the folder, so the
curve continues with no step twice. MLflow keeps every value it was sent: the steps between a
checkpoint and a crash are sent again on resume, and MLflow shows the latest value of a step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

from genforge.common.progress import MetricsLog, console
from genforge.common.runs import RunDir, atomic_write_text

TB_DIR = "tb"
MLFLOW_REF = "mlflow.json"


class TrackedMetrics(MetricsLog):
    """metrics.jsonl plus the same scalars in TensorBoard (and MLflow when configured).

    The writers open on the first row logged, after the loop has decided between a fresh log
    (`reset`) and a resumed one (`truncate_after`).
    """

    def __init__(self, run: RunDir):
        super().__init__(run.metrics_path)
        self.run = run
        self.tb_dir = run.path / TB_DIR
        self._tb = None
        self._mlflow: _MLflowRun | None = None
        self._opened = False

    def reset(self) -> None:
        """A fresh run starts fresh logs."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        (self.run.path / MLFLOW_REF).unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        super().truncate_after(step)
        files = event_files(self.tb_dir)
        try:
            for path in files:
                truncate_event_file(path, step)
        except ImportError:
            console.print(f"[yellow]{self.tb_dir} left as it was: tensorboardX is not installed, so its steps "
                          f"after {step} stay there (pip install 'genforge[track]')[/]")

    def log(self, row: dict) -> None:
        super().log(row)
        if not self._opened:
            self._open()
        step = int(row.get("step", 0))
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(scalars, step)

    def close(self) -> None:
        """Flush the event file and mark the MLflow run finished."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow is not None:
            self._mlflow.finish()
            self._mlflow = None
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            console.print("[dim]no TensorBoard log: tensorboardX is not installed (pip install 'genforge[track]')[/]")
        else:
            # tensorboardX names files by the second and opens them with "wb": a segment number
            # keeps a resume started within the same second from overwriting the previous file.
            segment = len(event_files(self.tb_dir)) + 1
            self._tb = SummaryWriter(str(self.tb_dir), flush_secs=10, filename_suffix=f".{segment}")
        if os.environ.get("MLFLOW_TRACKING_URI"):
            self._mlflow = _MLflowRun.open(self.run)


def event_files(tb_dir: str | Path) -> list[Path]:
    """TensorBoard event files of a folder, in the order TensorBoard reads them (by name)."""
    tb_dir = Path(tb_dir)
    return sorted(tb_dir.glob("events.out.tfevents.*")) if tb_dir.is_dir() else []


def _records(data: bytes):
    """(raw record, payload) of each complete TFRecord: u64 length, u32 length crc, payload, u32
    payload crc. A record cut short by a killed writer ends the file."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos:end], data[pos + 12:pos + 12 + length]
        pos = end


def read_scalars(path: str | Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in one event file (what TensorBoard would plot)."""
    from tensorboardX.proto import event_pb2

    out = []
    for _, payload in _records(Path(path).read_bytes()):
        event = event_pb2.Event.FromString(payload)
        for v in event.summary.value:
            if v.HasField("simple_value"):
                out.append((v.tag, event.step, v.simple_value))
    return out


def truncate_event_file(path: Path, step: int) -> None:
    """Drop the summaries logged after `step` (and a half-written last record), as
    MetricsLog.truncate_after does for metrics.jsonl; written beside and renamed."""
    from tensorboardX.proto import event_pb2

    kept = bytearray()
    for raw, payload in _records(path.read_bytes()):
        event = event_pb2.Event.FromString(payload)
        if not event.HasField("summary") or event.step <= step:
            kept += raw
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(bytes(kept))
    os.replace(tmp, path)


# --- MLflow --------------------------------------------------------------------------------------

def _flat(tree: object, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, (list, tuple)) else str(tree)}


class _MLflowRun:
    """One MLflow run per genforge run, through MlflowClient (no global active run)."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, run: RunDir) -> _MLflowRun | None:
        """The run recorded in mlflow.json (a resume), or a new one with the recipe as params."""
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            console.print("[yellow]MLFLOW_TRACKING_URI is set but mlflow is not installed "
                          "(pip install 'genforge[mlflow]'): not logging to MLflow[/]")
            return None
        uri = os.environ["MLFLOW_TRACKING_URI"]
        ref_path = run.path / MLFLOW_REF
        try:
            client = MlflowClient(uri)
            ref = json.loads(ref_path.read_text(encoding="utf-8")) if ref_path.is_file() else {}
            if ref.get("tracking_uri") == uri and ref.get("run_id"):
                client.update_run(ref["run_id"], status="RUNNING")
                return cls(client, ref["run_id"])
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "genforge")
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
            recipe = run.read_recipe() if run.recipe_path.is_file() else {}
            provenance = recipe.pop("_provenance", {}) or {}
            tags = {"genforge.run_dir": str(run.path.resolve()), "genforge.family": str(recipe.get("family", "")),
                    "genforge.git_commit": str(provenance.get("git_commit"))}
            created = client.create_run(experiment_id, run_name=run.path.name, tags=tags)
            tracked = cls(client, created.info.run_id)
            from mlflow.entities import Param

            params = [Param(k[:250], v[:6000]) for k, v in _flat(recipe).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(tracked.run_id, params=params[i:i + 100])
            atomic_write_text(ref_path, json.dumps({"tracking_uri": uri, "experiment_id": experiment_id,
                                                    "run_id": tracked.run_id}) + "\n")
            return tracked
        except Exception as e:  # a tracking server that fails must not stop training
            _mlflow_failed(e)
            return None

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items() if math.isfinite(v)]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:
            _mlflow_failed(e)
            self.client = None

    def finish(self) -> None:
        if self.client is None:
            return
        try:
            self.client.set_terminated(self.run_id, status="FINISHED")
        except Exception as e:
            _mlflow_failed(e)


def _mlflow_failed(e: Exception) -> None:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    console.print(f"[yellow]MLflow logging off for this run: {type(e).__name__}: {first[:200]}[/]")


def log_artifacts(run: RunDir) -> None:
    """Send report.md, recipe.yaml and plots/ to the run's MLflow run (when it has one)."""
    ref_path = run.path / MLFLOW_REF
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not ref_path.is_file():
        return
    try:
        from mlflow.tracking import MlflowClient

        ref = json.loads(ref_path.read_text(encoding="utf-8"))
        if ref.get("tracking_uri") != uri:
            return
        client = MlflowClient(uri)
        for path in (run.report_path, run.recipe_path):
            if path.is_file():
                client.log_artifact(ref["run_id"], str(path))
        if run.plots_dir.is_dir() and any(run.plots_dir.iterdir()):
            client.log_artifacts(ref["run_id"], str(run.plots_dir), artifact_path="plots")
    except Exception as e:
        _mlflow_failed(e)
