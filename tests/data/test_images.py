"""Image dataset folders: prepare, load, batches, augmentation, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genforge.common.config import from_dict
from genforge.common.errors import ConfigError, DataError
from genforge.data.images import (
    AugmentConfig,
    ImageBatches,
    ImageDataConfig,
    ImageDataset,
    augment_batch,
    load_image_data,
    looks_like_image_input,
    prepare_image_dataset,
    save_image_grid,
)


def _png(path: Path, size=(8, 8), mode="L", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "digits8"
    prepare_image_dataset("builtin:digits", out, seed=0)
    return out


def test_digits_prepare_and_load(digits: Path):
    stats = json.loads((digits / "stats.json").read_text())
    assert stats["num_images"] == 1797 and stats["train_images"] + stats["val_images"] == 1797
    assert stats["size"] == 8 and stats["channels"] == 1 and stats["num_classes"] == 10
    # stratified: every class has images in val
    assert all(n > 0 for n in stats["class_counts"]["val"].values())
    ds = ImageDataset(digits)
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert ds.classes == [str(i) for i in range(10)] and ds.content_hash == stats["content_hash"]
    xtr, ytr = ds.split("train")
    xva, yva = ds.split("val")
    assert len(xtr) == stats["train_images"] and len(yva) == stats["val_images"]
    with pytest.raises(DataError, match="unknown split"):
        ds.split("test")


def test_digits_resize_is_deterministic(tmp_path: Path):
    a = prepare_image_dataset("builtin:digits", tmp_path / "a", size=16, seed=3)
    b = prepare_image_dataset("builtin:digits", tmp_path / "b", size=16, seed=3)
    assert a["content_hash"] == b["content_hash"] and a["size"] == 16
    assert np.load(tmp_path / "a" / "images.npy").shape == (1797, 1, 16, 16)
    assert looks_like_image_input("builtin:digits")


def test_folder_of_classes_with_mode_majority(tmp_path: Path):
    src = tmp_path / "src"
    for i in range(3):
        _png(src / "cats" / f"{i}.png", mode="RGB")
        _png(src / "dogs" / f"{i}.jpg", mode="RGB", value=40)
    _png(src / "dogs" / "gray.png", mode="L")  # the minority mode is converted
    assert looks_like_image_input(src) and not looks_like_image_input(tmp_path / "nothing")
    docs = tmp_path / "docs"  # a text corpus with a figure stays text
    _png(docs / "fig.png")
    for i in range(2):
        (docs / f"{i}.md").write_text("text")
    assert not looks_like_image_input(docs)
    with pytest.warns(UserWarning, match="converted 1 of 7 images to RGB"):
        stats = prepare_image_dataset(str(src), tmp_path / "out", val_fraction=0.3)
    assert stats["channels"] == 3 and stats["classes"] == ["cats", "dogs"] and stats["converted"] == 1
    ds = ImageDataset(tmp_path / "out")
    assert ds.images.shape == (7, 3, 8, 8) and ds.labels.tolist().count(1) == 4


def test_folder_without_images(tmp_path: Path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("hi")
    assert not looks_like_image_input(tmp_path / "empty")
    with pytest.raises(DataError, match="no images found"):
        prepare_image_dataset(str(tmp_path / "empty"), tmp_path / "out")


def test_mixed_sizes_need_size(tmp_path: Path):
    _png(tmp_path / "src" / "a" / "1.png", size=(8, 8))
    _png(tmp_path / "src" / "a" / "2.png", size=(12, 10))
    with pytest.raises(DataError, match=r"8x8 \(1 images\).*12x10.*--size"):
        prepare_image_dataset(str(tmp_path / "src"), tmp_path / "out")
    stats = prepare_image_dataset(str(tmp_path / "src"), tmp_path / "out", size=8, val_fraction=0.5)
    assert stats["size"] == 8 and stats["num_images"] == 2


def test_corrupt_file_skipped_then_error_when_none_left(tmp_path: Path):
    src = tmp_path / "src"
    _png(src / "a" / "ok.png")
    _png(src / "a" / "ok2.png")
    (src / "a" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="broken.png"):
        stats = prepare_image_dataset(str(src), tmp_path / "out", val_fraction=0.5)
    assert stats["num_images"] == 2 and stats["skipped"][0]["file"].endswith("broken.png")
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 image files"):
        prepare_image_dataset(str(bad), tmp_path / "out2")


def test_error_leaves_existing_output_untouched(tmp_path: Path, digits: Path):
    out = tmp_path / "out"
    _png(tmp_path / "src" / "a" / "1.png")
    _png(tmp_path / "src" / "a" / "2.png")
    prepare_image_dataset(str(tmp_path / "src"), out, val_fraction=0.5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _png(tmp_path / "src" / "a" / "3.png", size=(16, 16))  # now mixed sizes
    with pytest.raises(DataError):
        prepare_image_dataset(str(tmp_path / "src"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a folder that is not a dataset is never replaced
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match="not a dataset folder"):
        prepare_image_dataset("builtin:digits", tmp_path / "precious")
    with pytest.raises(DataError, match="unknown built-in"):
        prepare_image_dataset("builtin:mnist", tmp_path / "o")
    with pytest.raises(ConfigError, match="val-fraction"):
        prepare_image_dataset("builtin:digits", tmp_path / "o", val_fraction=0)
    with pytest.raises(DataError, match="not an image dataset"):
        ImageDataset(tmp_path / "precious")


def test_image_batches_are_a_pure_function_of_index(digits: Path):
    ds = ImageDataset(digits)
    x, y = ds.split("train")
    aug = AugmentConfig(crop_prob=0.5, flip_prob=0.5, brightness=0.2, contrast=0.2)
    a = ImageBatches(x, y, 32, seed=7, augment=aug)
    b = ImageBatches(x, y, 32, seed=7, augment=aug)
    for i in (5, 0, 60, 5):  # any order, any object: same batch
        assert torch.equal(a.train_batch(i)["images"], b.train_batch(i)["images"])
    assert not torch.equal(a.train_batch(1)["images"], a.train_batch(2)["images"])
    assert not torch.equal(a.train_batch(1)["labels"], ImageBatches(x, y, 32, seed=8).train_batch(1)["labels"])
    # one epoch visits every image exactly once, across batches that straddle the epoch boundary
    plain = ImageBatches(x, y, 50, seed=1)
    seen = torch.cat([plain.indices(i) for i in range(2 * len(x) // 50 + 1)])
    assert sorted(seen[:len(x)].tolist()) == list(range(len(x)))
    assert sorted(seen[len(x):2 * len(x)].tolist()) == list(range(len(x)))
    assert plain.train_batch(0)["labels"].dtype == torch.long
    v1, v2 = plain.val_batches(3), plain.val_batches(3)
    assert len(v1) == 3 and all(torch.equal(p["images"], q["images"]) for p, q in zip(v1, v2))


def test_augment_config_and_ops():
    with pytest.raises(ConfigError, match="flip_prob"):
        from_dict(AugmentConfig, {"flip_prob": 2}, "data.augment")
    with pytest.raises(ConfigError, match="did you mean 'flip_prob'"):
        from_dict(AugmentConfig, {"flip_prb": 0.5}, "data.augment")
    with pytest.raises(ConfigError, match="crop_scale"):
        from_dict(AugmentConfig, {"crop_scale": [0.9, 0.5]}, "data.augment")
    x = torch.linspace(-1, 1, 8).repeat(2, 1, 8, 1)  # a left-to-right ramp
    g = torch.Generator().manual_seed(0)
    flipped = augment_batch(x, AugmentConfig(flip_prob=1.0), g)
    assert torch.allclose(flipped, x.flip(-1), atol=1e-5)
    assert augment_batch(x, AugmentConfig(), g) is x  # nothing enabled: untouched
    jit = augment_batch(x, AugmentConfig(brightness=0.5, contrast=0.5, crop_prob=1.0), g)
    assert jit.shape == x.shape and jit.min() >= -1 and jit.max() <= 1


def test_load_image_data_excludes_classes(digits: Path, tmp_path: Path):
    ds, batches, cfg = load_image_data(digits, {"exclude_classes": [9, "3"]}, 64, 0)
    assert isinstance(cfg, ImageDataConfig)
    labels = torch.cat([batches.train_batch(i)["labels"] for i in range(30)])
    assert not ({3, 9} & set(labels.tolist()))
    assert not ({3, 9} & set(torch.cat([b["labels"] for b in batches.val_batches(100)]).tolist()))
    _, sized, _ = load_image_data(digits, {"val_batch_size": 50}, 64, 0)
    assert [len(b["images"]) for b in sized.val_batches(2)] == [50, 50]
    with pytest.raises(DataError, match="unknown class '11'"):
        load_image_data(digits, {"exclude_classes": [11]}, 64, 0)
    with pytest.raises(ConfigError, match="unknown key 'data.augmnt'"):
        load_image_data(digits, {"augmnt": {}}, 64, 0)
    png = save_image_grid(ds.images[:10], tmp_path / "grid.png", scale=2)
    assert Image.open(png).size == ((4 * 9 + 1) * 2, (3 * 9 + 1) * 2)
