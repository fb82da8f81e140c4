"""`genforge runs list`, `genforge runs compare` and `genforge report --html` over real runs."""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from genforge.cli import main
from genforge.common.config import recipe_from_tree
from genforge.data.images import prepare_image_dataset
from genforge.jobs.train import run_loaded_recipe, run_recipe
from tests.conftest import make_tiny_recipe


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, char_dataset) -> Path:
    """runs/ holding two LM runs (different learning rates), a GAN run nested one level deeper,
    and folders that are not runs."""
    tmp = tmp_path_factory.mktemp("runs-list")
    run_recipe(make_tiny_recipe(tmp, char_dataset, name="slow", max_steps=20, lr=1e-3))
    run_recipe(make_tiny_recipe(tmp, char_dataset, name="fast", max_steps=20, lr=3e-3))
    digits = tmp / "digits"
    prepare_image_dataset("builtin:digits", digits)
    gan = {"name": "gan", "family": "gan", "dataset": str(digits), "out_dir": str(tmp / "runs" / "images"),
           "model": {"latent_dim": 8, "g_channels": 8, "d_channels": 8},
           "train": {"max_steps": 4, "batch_size": 16, "eval_every": 2, "eval_batches": 1, "log_every": 2,
                     "checkpoint_every": 4, "warmup_steps": 1, "seed": 0}}
    run_loaded_recipe(recipe_from_tree(gan))
    runs = tmp / "runs"
    # recipe.yaml is written when a run starts: make the order unambiguous
    for i, name in enumerate(("slow", "fast", "images/gan")):
        os.utime(runs / name / "recipe.yaml", (time.time() - 100 + i, time.time() - 100 + i))
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run")
    (runs / ".fast.tmp-1234").mkdir()
    return runs


def run_cli(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> list[list[str]]:
    """The header row (┃) and body rows (│) of a rich table, cell by cell."""
    return [[c.strip() for c in re.split("[│┃]", line.strip()[1:-1])] for line in out.splitlines()
            if line.strip()[:1] in ("│", "┃")]


def test_runs_list_shows_every_run_oldest_first(runs_root, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "runs", "list", str(runs_root))
    assert code == 0
    rows = table_rows(out)
    header, body = rows[0], rows[1:]
    assert header == ["name", "family", "steps", "best val loss", "wall time", "dataset", "created"]
    assert [r[:3] for r in body] == [["slow", "lm", "20"], ["fast", "lm", "20"], ["images/gan", "gan", "4"]]
    slow_val = min(r["val_loss"] for r in _metrics(runs_root / "slow") if "val_loss" in r)
    assert float(body[0][3]) == pytest.approx(slow_val, rel=1e-3)
    assert float(body[1][3]) < float(body[0][3])  # the higher learning rate learns faster in 20 steps
    assert all(r[4].endswith("s") for r in body) and body[2][5] == "…/runs-list0/digits"  # long paths shortened
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", body[0][6])


def _metrics(run: Path) -> list[dict]:
    from genforge.common.runs import RunDir

    return RunDir(run).read_metrics()


def test_runs_list_bad_folder_exits_2(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "runs", "list", str(tmp_path / "nope"))
    assert code == 2 and out == "" and err.startswith("error: runs folder not found") and err.count("\n") == 1
    code, out, _ = run_cli(capsys, monkeypatch, "runs", "list", str(tmp_path))
    assert code == 0 and out.strip() == f"no runs in {tmp_path}"


def test_runs_compare_writes_the_table_and_the_curves(runs_root, tmp_path, capsys, monkeypatch):
    out_png = tmp_path / "cmp.png"
    code, out, _ = run_cli(capsys, monkeypatch, "runs", "compare", str(runs_root / "slow"), str(runs_root / "fast"),
                           "--out", str(out_png))
    assert code == 0 and out.strip().endswith(f"curves: {out_png}")
    rows = {r[0]: r[1:] for r in table_rows(out)}
    assert rows["metric"] == ["slow", "fast"]
    assert list(rows)[1:3] == ["loss", "val_loss"]
    for name, col in (("slow", 0), ("fast", 1)):
        vals = [r["val_loss"] for r in _metrics(runs_root / name) if "val_loss" in r]
        final, best = re.fullmatch(r"(\S+) \((\S+)\)", rows["val_loss"][col]).groups()
        assert float(final) == pytest.approx(vals[-1], rel=1e-3) and float(best) == pytest.approx(min(vals), rel=1e-3)
    assert re.fullmatch(r"\S+", rows["lr"][0])  # no "best" for a learning rate
    with Image.open(out_png) as im:
        assert im.format == "PNG" and im.width > 1000  # two panels: loss and val_loss


def test_runs_compare_default_plot_path(runs_root, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "runs", "compare", str(runs_root / "slow"), str(runs_root / "fast"))
    assert code == 0 and (runs_root / "compare-slow-fast.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["notes", "slow"], "is not a genforge run (no recipe.yaml)"),
    (["slow", "missing"], "run directory not found"),
    (["slow"], "needs at least two runs"),
])
def test_runs_compare_bad_input_exits_2(runs_root, capsys, monkeypatch, args, message):
    code, out, err = run_cli(capsys, monkeypatch, "runs", "compare", *[str(runs_root / a) for a in args])
    assert code == 2 and message in err and err.count("\n") == 1


def test_runs_compare_runs_with_no_shared_metric(runs_root, tmp_path, capsys, monkeypatch):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(runs_root / "slow", other)
    (other / "metrics.jsonl").write_text('{"step": 1, "fid": 3.0}\n')
    code, _, err = run_cli(capsys, monkeypatch, "runs", "compare", str(runs_root / "slow"), str(other))
    assert code == 2 and "share no metric" in err and "other: fid" in err


def test_report_html_is_self_contained(runs_root, tmp_path, capsys, monkeypatch):
    run = runs_root / "images" / "gan"
    grid = Image.new("RGB", (8, 8), (255, 0, 0))
    grid.save(run / "samples" / "grid.png")
    out = tmp_path / "report.html"
    code, stdout, _ = run_cli(capsys, monkeypatch, "report", str(run), "--html", "--out", str(out))
    assert code == 0 and stdout.strip() == f"wrote {out}"
    page = out.read_text()
    assert "<table>" in page and "Run <code>gan</code>" in page  # report.md rendered, tables included
    assert not re.search(r"https?:", page) and "<script" not in page and "<link" not in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # the loss plot of report.md, and the sample grid it does not show
    assert base64.b64decode(images[0]) == (run / "plots" / "loss.png").read_bytes()
    assert base64.b64decode(images[1]) == (run / "samples" / "grid.png").read_bytes()
    assert not re.search(r'src="(?!data:)', page)


def test_report_html_without_a_report_exits_2(runs_root, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "report", str(runs_root / "notes"), "--html")
    assert code == 2 and "has no report.md" in err
    assert not (runs_root / "notes" / "report.html").exists()
