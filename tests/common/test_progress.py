import json
import os

import pytest

from genforge.common.progress import MetricsLog


def test_truncate_after_keeps_rows_up_to_the_step_and_drops_a_half_written_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15):
        log.log({"step": step, "loss": step / 10})
    with log.path.open("a") as f:
        f.write('{"step": 20, "lo')  # the line a killed run was writing
    log.truncate_after(10)
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10]


def test_truncate_after_is_atomic(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15):
        log.log({"step": step})
    before = log.path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # the new log is written beside the old one and renamed; a failure before the rename keeps the old
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        log.truncate_after(5)
    assert log.path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind
