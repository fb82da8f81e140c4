import json

import pytest

from genforge.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_leaves_a_report(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--minutes", "0.15"]) == 0
    run = tmp_path / "demo"
    report = (run / "report.md").read_text()
    for section in ("# Run `demo`", "## Training", "## Evaluation", "## Samples", "plots/loss.png"):
        assert section in report
    assert (run / "plots" / "loss.png").stat().st_size > 1000
    samples = json.loads((run / "samples" / "samples.json").read_text())
    assert len(samples) == 4 and all(s["completion"] for s in samples)
    assert (run / "model" / "config.json").is_file()
    assert "report.md" in capsys.readouterr().err
