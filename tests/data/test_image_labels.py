"""AIGC labels: the metadata round trip (PNG text chunk and XMP, every field), stripped metadata, the visible
label's size rule, grids written through save_image_grid, and files that are not images."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from genforge.common.errors import ConfigError, DataError
from genforge.data.image_labels import (
    STANDARD_FIELDS,
    TC260_NS,
    VisibleLabel,
    add_visible_label,
    aigc_label,
    detect_image,
    detect_image_bytes,
    png_bytes,
    read_label,
    resolve_key,
    save_png,
)
from genforge.data.image_watermark import InvisibleMark
from genforge.data.images import save_image_grid

KEY = "labels-key"


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    from sklearn.datasets import load_digits

    d = load_digits().images[7]
    return np.asarray(Image.fromarray(np.rint(d * 255 / 16).astype(np.uint8)).resize((16, 16), Image.BICUBIC))


def test_every_field_round_trips_in_the_text_chunk_and_the_xmp(digit):
    label = aigc_label("acme-ai", model="digits", run="runs/digits", family="diffusion", attributes={"seed": 3})
    data = png_bytes(digit, label)
    im = Image.open(io.BytesIO(data))
    text = json.loads(im.info["AIGC"])
    xmp = im.info["XML:com.adobe.xmp"]
    assert TC260_NS in xmp and "<xmp:CreatorTool>genforge" in xmp
    back = read_label(data)
    assert back["found_in"] == ["png-text:AIGC", "xmp:TC260:AIGC"] and back["consistent"] is True
    assert back["creator_tool"].startswith("genforge ")
    aigc = back["aigc"]
    assert aigc == text and set(STANDARD_FIELDS) <= set(aigc)
    assert aigc["Label"] == "1" and aigc["ContentProducer"] == "acme-ai"
    g = aigc["genforge"]
    assert aigc["ProduceID"] == g["content_id"] and re.fullmatch(r"[0-9a-f]{32}", g["content_id"])
    assert (g["model"], g["run"], g["family"], g["content_type"], g["seed"]) == (
        "digits", "runs/digits", "diffusion", "image", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", g["created"])
    assert aigc["ReservedCode1"].startswith("sha256:")
    # The XMP alone carries the same label (a tool that only reads XMP sees it all).
    only_xmp = Image.open(io.BytesIO(data))
    only_xmp.info.pop("AIGC")
    from genforge.data.image_labels import _read

    assert _read(only_xmp)["aigc"] == aigc
    # Two images never share a content id.
    assert read_label(png_bytes(digit, aigc_label()))["aigc"]["ProduceID"] != aigc["ProduceID"]


def test_stripped_metadata_leaves_the_invisible_mark(digit, tmp_path):
    path = save_png(tmp_path / "a.png", digit, aigc_label(), mark=InvisibleMark(KEY))
    r = detect_image(path, KEY)
    assert r["metadata"]["aigc"]["genforge"]["watermark"] == "genforge-dct-sign-v1" and r["pixels_match"] is True
    assert r["watermark"]["verdict"] == "watermarked"
    stripped = io.BytesIO()
    Image.open(path).save(stripped, format="PNG")  # re-saved without the chunks: metadata gone
    r = detect_image(stripped.getvalue(), KEY)
    assert r["metadata"] is None and r["pixels_match"] is None
    assert r["watermark"]["verdict"] == "watermarked" and r["watermark"]["z_score"] > 5
    wrong = detect_image(stripped.getvalue(), "not-the-key")["watermark"]
    assert wrong["verdict"] == "not_watermarked" and wrong["p_value"] > 1e-3
    assert detect_image(stripped.getvalue())["watermark"] is None  # no key: not checked


def test_edited_pixels_no_longer_match_the_label(digit):
    data = png_bytes(digit, aigc_label())
    im = Image.open(io.BytesIO(data))
    arr = np.asarray(im).copy()
    arr[0, 0] ^= 1
    edited = Image.fromarray(arr)
    buf = io.BytesIO()
    edited.save(buf, format="PNG", pnginfo=_copy_chunks(im))
    assert detect_image(buf.getvalue())["pixels_match"] is False


def _copy_chunks(im):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("AIGC", im.info["AIGC"])
    info.add_itxt("XML:com.adobe.xmp", im.info["XML:com.adobe.xmp"])
    return info


@pytest.mark.parametrize("size", [(16, 16), (64, 64), (300, 200), (548, 548)])
def test_visible_label_is_at_least_5_percent_of_the_shortest_side(size):
    img = Image.fromarray(np.full(size[::-1], 30, np.uint8))
    out, info = add_visible_label(img)
    assert info["text_height"] >= math.ceil(0.05 * min(size)) and info["text_height"] >= info["min_height"]
    assert info["text"] == ("AI" if size[0] < 40 else "AI-generated")
    diff = np.asarray(out, dtype=int) - np.asarray(img)
    ys, xs = np.nonzero(diff)
    assert ys.min() >= size[1] / 2 and ys.max() == size[1] - 1 and xs.max() == size[0] - 1  # bottom-right
    assert np.asarray(out).max() == 255  # a bright box on a dark image


def test_visible_label_options():
    img = Image.fromarray(np.full((64, 64), 230, np.uint8))
    out, info = add_visible_label(img, VisibleLabel(text="GEN", corner="top-left"))
    ys, xs = np.nonzero(np.asarray(out, dtype=int) - np.asarray(img))
    assert info["text"] == "GEN" and ys.max() < 32 and xs.max() < 32 and np.asarray(out).min() == 0
    with pytest.raises(ConfigError, match="font"):
        VisibleLabel(text="AI生成")  # PIL's own font has no CJK glyphs
    with pytest.raises(ConfigError, match="corner"):
        VisibleLabel(corner="middle")


def test_grids_always_carry_the_label_naming_their_run(tmp_path):
    run = tmp_path / "runs" / "digits"
    (run / "samples").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: digits\nfamily: diffusion\n")
    path = save_image_grid(torch.rand(6, 1, 8, 8) * 2 - 1, run / "samples" / "grid.png", scale=2)
    g = read_label(path)["aigc"]["genforge"]
    assert g["run"] == str(run.resolve()) and g["family"] == "diffusion" and g["layout"] == "grid"
    assert "visible_label" not in g and "watermark" not in g  # training grids: metadata only
    assert not list(path.parent.glob(".*"))  # written to a temp file and renamed


@pytest.mark.parametrize("content, match", [(b"plain text, not an image", "not an image"),
                                            (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image")])
def test_not_an_image_is_a_clear_error(tmp_path, content, match):
    f = tmp_path / "x.png"
    f.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        read_label(f)
    assert str(f) in str(e.value)
    with pytest.raises(DataError, match="uploaded file"):
        detect_image_bytes(content, KEY)
    with pytest.raises(DataError, match="cannot read"):
        read_label(tmp_path / "missing.png")
    with pytest.raises(DataError, match="folder"):
        read_label(tmp_path)


def test_jpeg_without_metadata_is_none(digit):
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, format="JPEG")
    assert read_label(buf.getvalue()) is None


def test_resolve_key(tmp_path):
    f = tmp_path / "k"
    f.write_text("\n  secret  \n")
    assert resolve_key(None, str(f)) == "secret" and resolve_key("a", None) == "a"
    assert resolve_key(None, None, {"GENFORGE_IMAGE_WATERMARK_KEY": "env"}) == "env"
    assert resolve_key(None, None, {}) is None
    for args, match in (((" ", None), "empty"), (("a", str(f)), "one of them"), ((None, str(tmp_path / "no")), "cannot"),
                        ((None, None, {"GENFORGE_IMAGE_WATERMARK_KEY": ""}), "empty")):
        with pytest.raises(ConfigError, match=match):
            resolve_key(*args)
