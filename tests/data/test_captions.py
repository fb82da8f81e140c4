"""Captioned image sets: measured attributes, the built-in captioned digits, a user's captions.jsonl."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genforge.cli import main
from genforge.common.errors import DataError
from genforge.data.captions import (
    ATTRIBUTE_LEVELS,
    HELDOUT_TEMPLATES,
    attribute_bins,
    caption_for,
    digit_caption_rows,
    is_chinese,
    load_captions,
    measure_attributes,
    tertile_edges,
    unknown_token_share,
)
from genforge.data.images import load_image_data, prepare_image_dataset

# ------------------------------------------------------------------------------ phrasing

def test_caption_for_fills_classes_attributes_and_articles():
    assert caption_for(8, {}, "a {adj} handwritten {word}") == "a handwritten eight"
    assert caption_for(8, {}, "a {adj} {word}") == "an eight"
    assert caption_for(1, {}, "a {adj} {word}") == "a one"
    assert caption_for("7", {"thickness": "thick"}, "the digit {digit}{desc}", variant=1) == \
        "the digit 7, written thickly"
    three = caption_for(3, {"size": "small", "thickness": "thick", "slant": "right"}, "the number {word}{desc}")
    assert three == "the number three, written small, written thickly and slanted to the right"
    assert caption_for(7, {"thickness": "thick", "slant": "right"}, "一个{zh_adj}{digit}") == "一个粗体的、向右倾斜的7"
    assert caption_for(7, {}, "手写的数字{zh}{zh_desc}") == "手写的数字七"
    assert caption_for("cat", {"size": "large"}, "a {adj} {word}") == "a large cat"
    with pytest.raises(DataError, match="thickness level"):
        caption_for(1, {"thickness": "huge"}, "{word}{desc}")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    # an empty slot collapses its spaces, and "a" may have become "an"
    literal = [re.escape(p).replace("\\ ", " ?") for p in parts]
    literal = [re.sub(r"\ba \?", "an? ?", p) for p in literal]
    return re.compile(".*?".join(literal))


# ------------------------------------------------------------------------------ the built-in set

@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("cap") / "digits-captions"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_image_dataset("builtin:digits-captions", out, seed=0)
    return out, caught


def test_builtin_rows_have_the_contract_fields(captioned):
    out, _ = captioned
    stats = json.loads((out / "stats.json").read_text())
    rows = load_captions(out)
    assert stats["size"] == 32 and len(rows) == stats["num_images"] == 1797
    edges = stats["caption_attribute_edges"]
    assert set(edges) == set(ATTRIBUTE_LEVELS)
    assert all(set(e) == set(stats["classes"]) and all(lo < hi for lo, hi in e.values()) for e in edges.values())
    for i, r in enumerate(rows):
        assert r["index"] == i and len(r["captions"]) == 6 and len(r["heldout_captions"]) == 4
        assert set(r["measures"]) == set(ATTRIBUTE_LEVELS)
    # the saved levels are the measures binned with the saved edges (what eval will do)
    measures = {a: np.array([r["measures"][a] for r in rows]) for a in ATTRIBUTE_LEVELS}
    labels = np.load(out / "labels.npy")
    bins = attribute_bins(measures, edges, [stats["classes"][y] for y in labels])
    assert all(bins[a][i] == r["attributes"][a] for i, r in enumerate(rows) for a in ATTRIBUTE_LEVELS)
    # tertiles of each class's training images: each level a third of the split (+-1 per class) ...
    for levels in stats["caption_attribute_counts"]["train"].values():
        assert max(levels.values()) - min(levels.values()) <= 10
    # ... and of each class: a seven is not "right-leaning" just because of its stroke's shear
    sevens = [r["attributes"]["slant"] for r, y in zip(rows, labels) if y == 7]
    assert 0.25 < sevens.count("right") / len(sevens) < 0.42
    # and re-measuring the stored pixels gives the stored measures
    images = np.load(out / "images.npy")
    again = measure_attributes(images[:50])
    np.testing.assert_allclose(again["slant"], measures["slant"][:50], atol=1e-4)


def test_heldout_templates_never_caption_training_images(captioned):
    rows = load_captions(captioned[0])
    train = [c for r in rows for c in r["captions"]]
    heldout = [c for r in rows for c in r["heldout_captions"]]
    held_re = [_template_regex(t) for t in HELDOUT_TEMPLATES]
    assert not set(train) & set(heldout)
    assert not any(p.fullmatch(c) for c in set(train) for p in held_re)
    assert all(any(p.fullmatch(c) for p in held_re) for c in set(heldout))
    # every held-out template is used, Chinese ones included
    assert all(any(p.fullmatch(c) for c in heldout) for p in held_re)
    assert any(is_chinese(t) for t in HELDOUT_TEMPLATES)


def test_builtin_captions_are_bilingual_and_say_more_than_the_class(captioned):
    rows = load_captions(captioned[0])
    for r in rows[:200]:
        assert any(is_chinese(c) for c in r["captions"]) and any(not is_chinese(c) for c in r["captions"])
        assert any(is_chinese(c) for c in r["heldout_captions"])
    train = [c for r in rows for c in r["captions"]]
    said = {lv: sum(lv in c for c in train) for lv in ("thick", "slanted", "small", "粗体", "向右倾斜")}
    assert all(n > 100 for n in said.values()), said
    # numbers as words, numerals and Chinese numerals
    sevens = [c for r, lab in zip(rows, np.load(captioned[0] / "labels.npy")) if lab == 7 for c in r["captions"]]
    assert any("seven" in c for c in sevens) and any("7" in c for c in sevens) and any("七" in c for c in sevens)


def test_builtin_warns_that_the_default_encoder_cannot_read_the_chinese(captioned):
    out, caught = captioned
    messages = [str(w.message) for w in caught if "[UNK]" in str(w.message)]
    assert len(messages) == 1 and "all-MiniLM-L6-v2" in messages[0] and "%" in messages[0]
    vocab = json.loads((out / "stats.json").read_text())["captions"]["vocabulary"]
    by_lang = vocab["mean_unknown_share_per_caption"]
    assert by_lang["other"] == 0 and by_lang["zh"] > 0.3  # English fully covered, Chinese largely not
    assert vocab["max_caption_tokens"] <= 32  # fits the recipe's max caption tokens


def test_builtin_captions_are_deterministic_per_seed():
    labels = np.arange(30) % 10
    measures = {a: np.random.default_rng(1).normal(size=30) for a in ATTRIBUTE_LEVELS}
    edges = tertile_edges(measures)
    a = digit_caption_rows(labels, [str(i) for i in range(10)], measures, edges, seed=0)
    b = digit_caption_rows(labels, [str(i) for i in range(10)], measures, edges, seed=0)
    c = digit_caption_rows(labels, [str(i) for i in range(10)], measures, edges, seed=1)
    assert a == b and a != c


def test_load_captions_refuses_uncaptioned_and_damaged_sets(tmp_path: Path, captioned):
    plain = tmp_path / "plain"
    prepare_image_dataset("builtin:digits", plain)
    with pytest.raises(DataError, match="no captions"):
        load_captions(plain)
    (plain / "captions.jsonl").write_text('{"index": 0, "captions": ["a zero"]}\n')
    with pytest.raises(DataError, match="1 rows for 1797 images"):
        load_captions(plain)
    ds, batches, _ = load_image_data(captioned[0], None, 8, 0)  # a captioned set still loads as images
    assert batches.train_batch(0)["images"].shape == (8, 1, 32, 32)


# ------------------------------------------------------------------------------ a user's folder

def _folder(root: Path) -> Path:
    for cls, n in (("cats", 3), ("dogs", 2)):
        for i in range(n):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 40 * i + 20 * len(cls)).save(root / cls / f"{i}.png")
    return root


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _all_rows(root: Path) -> list[dict]:
    return [{"file": str(p.relative_to(root)), "caption": f"a photo of {p.parent.name[:-1]} {p.stem}"}
            for p in sorted(root.rglob("*.png"))]


def _prepare(*args: str) -> int:
    return main(["data", "prepare", *args])


def test_cli_prepares_a_folder_with_its_captions(tmp_path: Path, capsys):
    root = _folder(tmp_path / "imgs")
    rows = _all_rows(root) + [{"file": "dogs/1.png", "captions": ["a sleepy dog", "dog on grass"]}]
    caps = _write(tmp_path / "captions.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # English captions: no vocabulary warning
        assert _prepare(str(root), "--captions", str(caps), "--out", str(tmp_path / "ds")) == 0
    out = load_captions(tmp_path / "ds")
    assert [r["file"] for r in out] == ["cats/0.png", "cats/1.png", "cats/2.png", "dogs/0.png", "dogs/1.png"]
    assert out[4]["captions"] == ["a photo of dog 1", "a sleepy dog", "dog on grass"]
    assert all(r["heldout_captions"] == [] for r in out)
    stats = json.loads((tmp_path / "ds" / "stats.json").read_text())
    assert stats["captions"]["captions"] == 7 and stats["captions"]["vocabulary"]["unknown_token_share"] == 0


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[:-1], "1 of 5 images have no caption row .*dogs/1.png"),
    (lambda rows: rows + [{"file": "dogs/7.png", "caption": "a dog"}], "dogs/7.png, which does not exist"),
    (lambda rows: rows + [{"file": "cats/0.png", "caption": ""}], 'cats/0.png: needs "caption"'),
    (lambda rows: rows + [{"caption": "no file"}], 'needs a "file"'),
])
def test_cli_names_the_bad_caption_row_and_writes_nothing(tmp_path: Path, capsys, mutate, message):
    root = _folder(tmp_path / "imgs")
    caps = _write(tmp_path / "captions.jsonl", mutate(_all_rows(root)))
    out = tmp_path / "ds"
    prepare_image_dataset("builtin:digits", out)  # an existing dataset must survive the failed prepare
    before = (out / "stats.json").read_text()
    assert _prepare(str(root), "--captions", str(caps), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and re.search(message, err), err
    assert (out / "stats.json").read_text() == before and not (out / "captions.jsonl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_cli_warns_with_the_unknown_share_for_an_unreadable_language(tmp_path: Path):
    root = _folder(tmp_path / "imgs")
    rows = _all_rows(root)
    rows[0]["caption"] = "ตัวเลขเจ็ดที่เขียนด้วยมือ"  # Thai: the MiniLM tokenizer has no Thai pieces
    caps = _write(tmp_path / "captions.jsonl", rows)
    with pytest.warns(UserWarning, match=r"1 of 5 captions \(20%\) .*100% of their tokens are \[UNK\]"):
        assert _prepare(str(root), "--captions", str(caps), "--out", str(tmp_path / "ds")) == 0
    assert load_captions(tmp_path / "ds")[0]["captions"] == ["ตัวเลขเจ็ดที่เขียนด้วยมือ"]
    share, per, _ = unknown_token_share(["a handwritten seven", "ตัวเลขเจ็ด"])
    assert per.tolist() == [0.0, 1.0] and 0 < share < 1


def test_cli_refuses_captions_where_they_cannot_apply(tmp_path: Path, capsys):
    caps = _write(tmp_path / "c.jsonl", [{"file": "x.png", "caption": "x"}])
    assert _prepare("builtin:digits", "--captions", str(caps), "--out", str(tmp_path / "a")) == 2
    assert "--captions is for a folder of images" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("hello world\n" * 20)
    assert _prepare(str(text), "--captions", str(caps), "--out", str(tmp_path / "b")) == 2
    assert "--captions is for a folder of images" in capsys.readouterr().err
    root = _folder(tmp_path / "imgs")
    assert _prepare(str(root), "--captions", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "c")) == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
