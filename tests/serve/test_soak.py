"""A short soak (benchmarks/soak.py): 4 clients x 20 s of mixed traffic against `genforge serve`
as a subprocess: no unexpected outcome, every request accounted for, nothing left in the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_soak(lm_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--run", str(lm_run), "--clients", "4",
                        "--duration", "20", "--cache", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["unexpected"] == 0, report["unexpected_examples"]
    assert report["all_accounted_for"], (report["started"], report["requests"], report["server_http_requests"])
    assert report["left_running"] == 0 and report["left_waiting"] == 0
    kinds = report["by_kind"]
    assert kinds["stream"].get("ok") and kinds["oversized"].get("refused") and kinds["malformed"].get("refused")
    assert kinds["cancel_stream"].get("cancelled")
    assert r.returncode == 0, r.stdout[-3000:]
