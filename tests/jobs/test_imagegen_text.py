"""`genforge generate RUN --prompt ...` for a text-to-image run: grid, image-to-image, inpainting, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from genforge.cli import main
from tests.conftest import T2I_SIZE


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An input image (32x32, resized by generate to the model's 16x16), a mask of its size, a bad mask."""
    root = tmp_path_factory.mktemp("t2i-files")
    image = np.zeros((32, 32), np.uint8)
    image[6:26, 12:20] = 255  # a bright bar: a "1"
    Image.fromarray(image).save(root / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255  # regenerate the right half
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:20]).save(root / "small-mask.png")
    (root / "notes.png").write_text("not an image")
    return root


def test_text_to_image_grid_and_settings(t2i_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["generate", str(t2i_run), "--prompt", "a thick, slanted three", "--negative-prompt", "thin",
                 "--num-samples", "4", "--guidance", "4", "--steps", "3", "--seed", "0", "--out", str(out)])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert len(singles) == 4 and Image.open(singles[0]).size == (T2I_SIZE, T2I_SIZE)
    settings = json.loads((tmp_path / "grid.json").read_text())
    assert settings["mode"] == "text-to-image" and settings["prompt"] == "a thick, slanted three"
    assert settings["negative_prompt"] == "thin" and settings["guidance"] == 4.0 and settings["seed"] == 0
    assert main(["generate", str(t2i_run / "model"), "--prompt", "a thick, slanted three", "--negative-prompt",
                 "thin", "--num-samples", "4", "--guidance", "4", "--steps", "3", "--seed", "0",
                 "--out", str(tmp_path / "again.png")]) == 0  # the model folder works too, same images
    assert Image.open(tmp_path / "again.png").tobytes() == Image.open(out).tobytes()


def test_image_to_image_and_inpainting_write_side_by_side(t2i_run, files, tmp_path, capsys):
    assert main(["generate", str(t2i_run), "--prompt", "a seven", "--init-image", str(files / "in.png"),
                 "--strength", "0.6", "--num-samples", "3", "--steps", "5", "--out", str(tmp_path / "i2i.png")]) == 0
    assert (tmp_path / "i2i-edit.png").is_file()  # input | outputs
    assert json.loads((tmp_path / "i2i.json").read_text())["strength"] == 0.6
    capsys.readouterr()
    assert main(["generate", str(t2i_run), "--prompt", "a seven", "--init-image", str(files / "in.png"),
                 "--mask", str(files / "mask.png"), "--num-samples", "3", "--steps", "4",
                 "--out", str(tmp_path / "fix.png")]) == 0
    printed = capsys.readouterr().out
    assert "fix-edit.png (input | mask | outputs)" in printed and "VAE round trip" in printed
    settings = json.loads((tmp_path / "fix.json").read_text())
    assert settings["mode"] == "inpaint" and settings["strength"] == 1.0
    assert settings["unmasked_max_error"] == 0 and settings["vae_round_trip_error"] > 0
    given = np.asarray(Image.open(files / "in.png").resize((T2I_SIZE, T2I_SIZE), Image.BICUBIC))
    for single in sorted((tmp_path / "fix").glob("*.png")):  # the files on disk keep the left half exactly
        assert np.array_equal(np.asarray(Image.open(single))[:, :8], given[:, :8])
    strip = Image.open(tmp_path / "fix-edit.png")
    scale = 64 // T2I_SIZE  # one row of five (input, mask, three outputs), 1 px apart, upscaled
    assert strip.size == ((5 * (T2I_SIZE + 1) + 1) * scale, (T2I_SIZE + 2) * scale)


@pytest.mark.parametrize("extra, match", [
    (["--strength", "1.5", "--init-image", "{files}/in.png"], r"strength: 1.5 is out of range \(0, 1\]"),
    (["--init-image", "{files}/in.png", "--mask", "{files}/small-mask.png"], "mask: 32x20 does not match"),
    (["--init-image", "{files}/notes.png"], "init_image: .*notes.png is not a readable image"),
    (["--init-image", "{files}/missing.png"], "does not exist"),
    (["--mask", "{files}/mask.png"], "--mask needs --init-image"),
    (["--class", "3"], "--class is for class-conditional runs"),
    (["--guidance", "40"], "guidance: 40.0 is out of range"),
    (["--out", "grid.jpg"], "must be a .png"),
])
def test_bad_input_is_one_line_and_exit_2(t2i_run, files, tmp_path, capsys, extra, match):
    args = [a.replace("{files}", str(files)) for a in extra]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.png")]
    assert main(["generate", str(t2i_run), "--prompt", "a three", "--steps", "2", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and __import__("re").search(match, err), err
    assert not (tmp_path / "x.png").exists()


def test_text_flags_are_refused_for_other_runs(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "recipe.yaml").write_text("name: r\nfamily: diffusion\n")
    assert main(["generate", str(tmp_path / "r"), "--mask", "m.png"]) == 2
    assert "--mask is for text-to-image (latent-diffusion) runs only" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "r"), "--negative-prompt", "x"]) == 2
