"""`genforge registry push|list|alias|show` and the registry flags of `genforge serve`, through the CLI's
own `main` on real folders and a real SQLite store: what they print, and one `error:` line with exit
code 2 for every bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from genforge.cli import main
from tests.common.test_registry import make_run


def genforge(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `genforge ARGV...` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def where(tmp_path: Path) -> list[str]:
    return ["--store", str(tmp_path / "state"), "--registry-dir", str(tmp_path / "registry")]


def one_error(code: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_push_list_alias_show(tmp_path: Path, where: list[str]):
    run = make_run(tmp_path / "run")
    code, out, err = genforge("registry", "push", str(run), "--name", "nano", *where)
    assert code == 0, err
    assert out.startswith(f"pushed nano@1 from {run}: 2 files")
    make_run(tmp_path / "run2", seed=2)
    assert genforge("registry", "push", str(tmp_path / "run2"), "--name", "nano", *where)[1].startswith("pushed nano@2")
    assert genforge("registry", "alias", "nano@1", "production", *where)[1].strip() == "nano@production -> nano@1"
    code, out, _ = genforge("registry", "list", *where)
    assert out.strip() == "nano: 2 version(s), latest 2, aliases production->1"
    code, out, _ = genforge("registry", "list", "nano", *where)
    rows = out.strip().splitlines()
    assert rows[0].split()[:3] == ["version", "pushed", "(UTC)"] and len(rows) == 3
    assert rows[1].split()[0] == "1" and rows[1].rstrip().endswith("production")
    assert "5eed0fda7a" in rows[1] and "val_loss 2.5" in rows[1]
    code, out, _ = genforge("registry", "show", "nano@production", *where)
    shown = json.loads(out)
    assert (shown["version"], shown["dataset"]["content_hash"]) == (1, "5eed0fda7a")
    assert Path(shown["folder"]).is_dir() and (Path(shown["folder"]) / "model.safetensors").is_file()


def test_bad_registry_input_is_one_line_and_exit_2(tmp_path: Path, where: list[str]):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    one_error(*genforge("registry", "push", str(empty), "--name", "nano", *where)[::2], "has no model")
    one_error(*genforge("registry", "list", "nano", *where)[::2], "no model 'nano'")
    genforge("registry", "push", str(make_run(tmp_path / "run")), "--name", "nano", *where)
    one_error(*genforge("registry", "alias", "nano@7", "production", *where)[::2], "nano@7: no such version")
    one_error(*genforge("registry", "show", "nano@production", *where)[::2], "no such version or alias")
    one_error(*genforge("registry", "alias", "nano@1", "latest", *where)[::2], "'latest' already name")
    one_error(*genforge("registry", "push", str(tmp_path / "run"), "--name", "no good", *where)[::2], "model name")


def test_bad_serve_registry_flags_are_one_line_and_exit_2(tmp_path: Path, where: list[str]):
    genforge("registry", "push", str(make_run(tmp_path / "run")), "--name", "nano", *where)
    one_error(*genforge("serve", "--model", "nano@2", *where)[::2], "nano@2: no such version")
    one_error(*genforge("serve", "--model", "nano@staging", *where)[::2], "no such version or alias")
    one_error(*genforge("serve", "--model", "nano@1", "--canary", "nano@1=150%", *where)[::2],
              "between 0 and 100")
    one_error(*genforge("serve", "--model", "nano@1", "--canary", "nano@1=-5", *where)[::2], "between 0 and 100")
    one_error(*genforge("serve", "--model", "nano@1", "--canary", "nano@1", *where)[::2], "NAME@VERSION=SHARE%")
    one_error(*genforge("serve", "--model", "nano@1", "--canary", "nano@1=ten", *where)[::2], "not a number")
    one_error(*genforge("serve", "--model", "nano@latest", "--canary", "nano@1=5%", *where)[::2], "that is the primary")
    one_error(*genforge("serve", str(tmp_path / "run"), "--model", "nano@1", *where)[::2], "give the model once")
    one_error(*genforge("serve", "--model", "nano@1", "--adapter", f"a={tmp_path}", *where)[::2], "--adapter")
