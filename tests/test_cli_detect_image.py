"""`genforge detect image FILE... [--key KEY | --key-file F] [--json]` (the image half of cli_detect.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from genforge.cli import main
from genforge.data.image_labels import aigc_label, save_png
from genforge.data.image_watermark import InvisibleMark


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("detect-image")
    d = load_digits().images[5]
    digit = np.asarray(Image.fromarray(np.rint(d * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BICUBIC))
    save_png(root / "marked.png", digit, aigc_label(model="digits", run="runs/digits", family="diffusion"),
             mark=InvisibleMark("cli-key"))
    Image.open(root / "marked.png").save(root / "stripped.png")  # no chunks
    Image.open(root / "marked.png").save(root / "stripped.jpg", quality=75)
    Image.fromarray(digit).save(root / "plain.png")
    (root / "notes.png").write_text("not an image")
    (root / "key").write_text("cli-key\n")
    return root


def test_label_and_watermark_are_reported(files, capsys):
    assert main(["detect", "image", str(files / "marked.png"), "--key-file", str(files / "key")]) == 0
    out = capsys.readouterr().out
    assert "label: AI-generated (in png-text:AIGC, xmp:TC260:AIGC); producer genforge" in out
    assert "model digits, run runs/digits, family diffusion" in out and "pixels: unchanged" in out
    assert "watermark: present for this key" in out


def test_stripped_and_jpeg_copies_keep_the_mark(files, capsys):
    assert main(["detect", "image", str(files / "stripped.png"), str(files / "stripped.jpg"), "--key", "cli-key"]) == 0
    out = capsys.readouterr().out
    assert out.count("label: no AIGC metadata") == 2 and out.count("watermark: present for this key") == 2


def test_wrong_key_and_no_key(files, capsys):
    assert main(["detect", "image", str(files / "marked.png"), "--key", "wrong"]) == 0
    assert "watermark: no watermark for this key" in capsys.readouterr().out
    assert main(["detect", "image", str(files / "plain.png")]) == 0
    out = capsys.readouterr().out
    assert "label: no AIGC metadata" in out and "not checked (give --key" in out


def test_json(files, capsys):
    assert main(["detect", "image", str(files / "marked.png"), "--key", "cli-key", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["metadata"]["aigc"]["Label"] == "1" and r["watermark"]["verdict"] == "watermarked"
    assert r["format"] == "PNG" and r["size"] == [32, 32]


@pytest.mark.parametrize("name, match", [("notes.png", "not an image"), ("missing.png", "cannot read")])
def test_not_an_image_is_one_line_and_exit_2(files, capsys, name, match):
    assert main(["detect", "image", str(files / name), "--key", "k"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_two_key_sources_are_refused(files, capsys):
    assert main(["detect", "image", str(files / "plain.png"), "--key", "a", "--key-file", str(files / "key")]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_bytes_in_memory_work_too():
    from genforge.data.image_labels import detect_image_bytes

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    assert detect_image_bytes(buf.getvalue(), "k")["watermark"]["verdict"] == "not_watermarked"
