import pytest

from genforge.common.runs import RunDir, atomic_dir, atomic_write_text, update_report


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def test_report_sections_are_replaced_independently(tmp_path):
    run = RunDir(tmp_path / "r").create()
    update_report(run, "training", "## Training\nold")
    update_report(run, "evaluation", "## Evaluation\nppl 3")
    update_report(run, "training", "## Training\nnew")
    update_report(run, "header", "# Run r")
    text = run.report_path.read_text()
    assert "old" not in text and "new" in text and "ppl 3" in text
    assert text.index("# Run r") < text.index("## Training") < text.index("## Evaluation")


def test_checkpoints_sorted_numerically(tmp_path):
    run = RunDir(tmp_path / "r").create()
    for n in (10, 2, 100):
        (run.checkpoints_dir / f"step-{n}").mkdir(parents=True)
    (run.checkpoints_dir / ".step-5.tmp-abc").mkdir()
    assert [p.name for p in run.checkpoints()] == ["step-2", "step-10", "step-100"]


def test_atomic_write_text_leaves_a_file_others_can_read(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(path, "# report\n")
    assert path.read_text() == "# report\n"
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp file left
