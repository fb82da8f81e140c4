"""Image dataset folders: prepare (folder of class subfolders, or builtin:digits), load, batch.

A prepared dataset folder holds

    images.npy    uint8, N x C x H x W
    labels.npy    int64, N
    classes.json  class names; index = label
    split.npy     int8, N: 0 = train, 1 = val (stratified per class, seeded)
    stats.json    counts per split and class, size, channels, content_hash, source, skipped files
    captions.jsonl  (captioned sets only: builtin:digits-captions or --captions; see data/captions.py)

`ImageDataset` reads it back as float images in [-1, 1]; `ImageBatches` is the training loop's
DataSource; `ImageDataConfig` is the recipe's `data:` section for every image family.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from genforge.common.config import Spec, from_dict, rng
from genforge.common.errors import ConfigError, DataError
from genforge.common.runs import atomic_dir
from genforge.data.augment import AugmentConfig, augment_batch
from genforge.data.captions import digit_captions, folder_captions
from genforge.data.image_labels import ImageLabelling, aigc_label, run_fields, save_png

__all__ = ["AugmentConfig", "ImageBatches", "ImageDataConfig", "ImageDataset", "augment_batch",
           "load_image_data", "looks_like_image_input", "prepare_image_dataset", "read_image_folder",
           "save_image_grid", "to_uint8"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTINS = ("builtin:digits", "builtin:digits-captions")
# builtin:digits-captions defaults to 32 x 32: a factor-4 latent autoencoder makes that an 8 x 8 latent,
# small enough to train on CPU, while the 8 x 8 originals would leave a 2 x 2 latent.
CAPTIONED_DIGITS_SIZE = 32
_TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".html")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
SPLITS = {"train": 0, "val": 1}


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def looks_like_image_input(path: str | os.PathLike) -> bool:
    """True for a built-in image set or a folder holding image files (the CLI picks prepare by it)."""
    if str(path) in BUILTINS:
        return True
    p = Path(path)
    if not p.is_dir():
        return False
    # A text corpus may hold a few figures and an image set a README: the majority decides.
    images = texts = 0
    for _root, _dirs, files in os.walk(p):
        for f in files:
            low = f.lower()
            images += low.endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            texts += low.endswith(_TEXT_EXTENSIONS)
        if images + texts > 10_000:
            break
    return images > texts


# --------------------------------------------------------------------------------------- reading

def _load_digits(size: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are 0..16 (16 = ink); spread them over the full uint8 range.
    imgs = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    if size is not None and size != imgs.shape[-1]:
        from PIL import Image

        imgs = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((size, size), Image.BICUBIC))
                         for im in imgs])
    return imgs[:, None], d.target.astype(np.int64), [str(c) for c in d.target_names]


def read_image_folder(folder: str | Path, *, size: int | None = None, channels: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Read a folder of images: class subfolders (name = class) or images directly in it.

    Returns (uint8 N x C x H x W, labels, classes, info) where info records skipped files, mode
    conversions and the sizes found. `channels` forces 1 or 3; default: the majority mode.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    files: list[tuple[Path, int]] = []
    classes: list[str] = []
    for d in class_dirs:
        found = sorted(p for p in d.rglob("*") if _is_image(p))
        if found:
            files += [(p, len(classes)) for p in found]
            classes.append(d.name)
    if loose and classes:
        raise DataError(f"{root}: holds both class subfolders ({', '.join(classes[:5])}) and loose images "
                        f"({loose[0].name}, ...); move the loose images into a class subfolder")
    if loose:  # no subfolders: one unnamed class
        classes = [root.resolve().name or "images"]
        files = [(p, 0) for p in loose]
    if not files:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files, "
                        "in class subfolders or directly in the folder)")

    loaded: list[tuple[Any, int, str]] = []
    skipped: list[dict] = []
    for p, label in files:
        try:
            with Image.open(p) as im:
                im.load()
                img = im.copy()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"skipping unreadable image {p}: {reason}", stacklevel=2)
            skipped.append({"file": str(p), "reason": reason})
            continue
        loaded.append((img, label, str(p)))
    if not loaded:
        raise DataError(f"{root}: none of the {len(files)} image files could be read "
                        f"(first: {skipped[0]['file']}: {skipped[0]['reason']})")

    gray = sum(1 for im, _, _ in loaded if im.mode in _GRAY_MODES)
    if channels is None:
        channels = 1 if gray > len(loaded) - gray else 3  # majority; a tie keeps colour
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    converted = len(loaded) - gray if channels == 1 else gray
    if converted:
        warnings.warn(f"{root}: converted {converted} of {len(loaded)} images to {mode} (the majority mode)",
                      stacklevel=2)
    sizes = Counter(im.size for im, _, _ in loaded)
    if size is None and len(sizes) > 1:
        found = ", ".join(f"{w}x{h} ({n} images)" for (w, h), n in sizes.most_common(5))
        raise DataError(f"{root}: images have different sizes ({found}); pass --size N to resize "
                        "them all to N x N")
    arrays, labels = [], []
    for im, label, _ in loaded:
        im = _to_mode(im, mode)
        if size is not None and im.size != (size, size):
            im = _center_square(im).resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(label)
    info = {"skipped": skipped, "converted": converted, "mode": mode, "files": [f for _, _, f in loaded],
            "sizes_found": {f"{w}x{h}": n for (w, h), n in sizes.most_common()}}
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), classes, info


def _to_mode(im: Any, mode: str) -> Any:
    if im.mode == mode:
        return im
    if im.mode in ("I", "I;16", "F"):  # wide greyscale: scale into 8 bits before converting
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        from PIL import Image

        im = Image.fromarray(np.clip(arr * 255.0 / hi, 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image

        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white, not black
        im = Image.alpha_composite(bg, rgba)
    return im.convert(mode)


def _center_square(im: Any) -> Any:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


# --------------------------------------------------------------------------------------- prepare

def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """0/1 per image; each class keeps its share in val (at least one image when it has two)."""
    split = np.zeros(len(labels), dtype=np.int8)
    rs = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * val_fraction))
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        split[rs.permutation(idx)[:n_val]] = 1
    return split


def _content_hash(images: np.ndarray, labels: np.ndarray, classes: list[str], split: np.ndarray,
                  captions: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(images.shape), "classes": classes}).encode())
    for arr in (images, labels, split):
        h.update(np.ascontiguousarray(arr).tobytes())
    if captions is not None:  # uncaptioned sets keep the hash they always had
        h.update(captions.encode("utf-8"))
    return h.hexdigest()[:16]


def prepare_image_dataset(input: str, out: str | Path, *, val_fraction: float = 0.1, size: int | None = None,
                          seed: int = 0, captions: str | Path | None = None) -> dict:
    """Write an image dataset folder at `out` from a folder of images, `builtin:digits` or
    `builtin:digits-captions`; `captions` (a folder's captions.jsonl) makes it a captioned set.

    Everything is read and checked before anything is written; `out` is replaced in one rename,
    so an error leaves an existing dataset as it was.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction: {val_fraction} is out of range (must be in (0, 1)); "
                          "image runs evaluate on the val split")
    if size is not None and not 4 <= size <= 1024:
        raise ConfigError(f"--size: {size} is out of range (must be in [4, 1024])")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "stats.json").is_file())):
        raise DataError(f"--out {out} exists and is not a dataset folder; refusing to replace it")
    info: dict = {"skipped": [], "converted": 0}
    if input.startswith("builtin:"):
        if input not in BUILTINS:
            raise DataError(f"unknown built-in image set {input!r} (available: {', '.join(BUILTINS)})")
        if captions is not None:
            raise ConfigError(f"--captions is for a folder of images; {input} has no files to caption "
                              "(builtin:digits-captions brings its own captions)")
        if input == "builtin:digits-captions" and size is None:
            size = CAPTIONED_DIGITS_SIZE
        images, labels, classes = _load_digits(size)
        source = input
    else:
        if not Path(input).exists():
            raise DataError(f"input not found: {input}")
        images, labels, classes, info = read_image_folder(input, size=size)
        source = str(Path(input).resolve())
    split = _stratified_split(labels, val_fraction, seed)
    caption_rows, caption_stats = None, {}
    if input == "builtin:digits-captions":
        caption_rows, caption_stats = digit_captions(images, labels, classes, split, seed)
    elif captions is not None:
        caption_rows, caption_stats = folder_captions(captions, input, info["files"],
                                                      [s["file"] for s in info["skipped"]])
    caption_text = None if caption_rows is None else "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in caption_rows)
    n, c, h, w = images.shape
    counts = {name: {cls: int(((labels == i) & (split == v)).sum()) for i, cls in enumerate(classes)}
              for name, v in SPLITS.items()}
    stats = {
        "kind": "images", "source": source, "num_images": int(n),
        "train_images": int((split == 0).sum()), "val_images": int((split == 1).sum()),
        "num_classes": len(classes), "size": h if h == w else [h, w], "height": h, "width": w,
        "channels": c, "dtype": "uint8", "layout": "NCHW", "value_range": [0, 255],
        "content_hash": _content_hash(images, labels, classes, split, caption_text),
        "classes": classes, "class_counts": counts, "val_fraction": val_fraction, "seed": seed,
        "resized_to": size, "converted": info.get("converted", 0), "skipped_files": len(info["skipped"]),
        "skipped": info["skipped"], **caption_stats,
    }
    with atomic_dir(out) as tmp:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "split.npy", split)
        (tmp / "classes.json").write_text(json.dumps(classes), encoding="utf-8")
        if caption_text is not None:
            (tmp / "captions.jsonl").write_text(caption_text, encoding="utf-8")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    return stats


# --------------------------------------------------------------------------------------- loading

class ImageDataset:
    """A prepared image dataset folder, as float images in [-1, 1]."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        stats_path = self.path / "stats.json"
        if not stats_path.is_file():
            raise DataError(f"{self.path} is not an image dataset folder (no stats.json); "
                            "write one with `genforge data prepare builtin:digits --out DIR`")
        self.stats: dict = json.loads(stats_path.read_text(encoding="utf-8"))
        if self.stats.get("kind") != "images":
            raise DataError(f"{self.path} is a {self.stats.get('kind', 'text')} dataset, not an image dataset")
        try:
            raw = np.load(self.path / "images.npy")
            self.labels = torch.from_numpy(np.load(self.path / "labels.npy").astype(np.int64))
            self._split = torch.from_numpy(np.load(self.path / "split.npy").astype(np.int64))
            self.classes: list[str] = json.loads((self.path / "classes.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: incomplete image dataset ({e}); prepare it again") from None
        self.images = torch.from_numpy(raw).float().div_(127.5).sub_(1.0)

    content_hash = property(lambda self: self.stats["content_hash"])
    channels = property(lambda self: int(self.images.shape[1]))
    num_classes = property(lambda self: len(self.classes))

    @property
    def size(self) -> int | tuple[int, int]:
        h, w = self.images.shape[-2:]
        return int(h) if h == w else (int(h), int(w))

    def class_index(self, name: str | int) -> int:
        """Index of a class given its name (or its index as a number); DataError names the classes."""
        key = str(name)
        if key in self.classes:
            return self.classes.index(key)
        if key.lstrip("-").isdigit() and 0 <= int(key) < len(self.classes) and not any(
                c.isdigit() for c in self.classes):
            return int(key)
        raise DataError(f"unknown class {key!r} in {self.path} (classes: {', '.join(self.classes)})")

    def split(self, name: str, exclude: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of split "train" or "val", optionally without some class indices."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r} (splits: {', '.join(SPLITS)})")
        keep = self._split == SPLITS[name]
        for c in exclude or []:
            keep &= self.labels != c
        return self.images[keep], self.labels[keep]


# --------------------------------------------------------------------------------------- batches

def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch) / (seed, index, stream)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class ImageBatches:
    """The training loop's DataSource for images: batch `i` is a pure function of `i`.

    Batch i covers positions i*B .. i*B+B-1 of an endless stream of epochs; epoch e is a
    permutation seeded with (seed, e), and augmentation of batch i is seeded with (seed, i), so a
    resumed run sees exactly the batches it would have seen. Validation batches (`val`, or the
    training images when none is given) are fixed, in order, never augmented.
    """

    tokens_per_batch = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 augment: AugmentConfig | None = None, *,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None, val_batch_size: int | None = None):
        if len(images) == 0:
            raise DataError("no training images (is every class excluded?)")
        if batch_size < 1:
            raise ConfigError(f"train.batch_size: {batch_size} must be >= 1")
        self.images, self.labels = images, labels.long()
        self.batch_size, self.seed = batch_size, seed
        self.augment = augment if augment is not None and augment.enabled else None
        self.val = val if val is not None and len(val[0]) > 0 else (images, self.labels)
        self.val_batch_size = val_batch_size or batch_size
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(len(self.images), generator=g)
            while len(self._perms) > 3:  # a batch spans at most two epochs unless B > N
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def indices(self, index: int) -> torch.Tensor:
        n = len(self.images)
        pos = torch.arange(index * self.batch_size, (index + 1) * self.batch_size)
        epochs, offsets = pos // n, pos % n
        out = torch.empty(self.batch_size, dtype=torch.long)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self._perm(int(e))[offsets[m]]
        return out

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        idx = self.indices(index)
        images = self.images[idx]
        if self.augment is not None:
            g = torch.Generator().manual_seed(_seed(self.seed, index, 1))
            images = augment_batch(images, self.augment, g)
        return {"images": images, "labels": self.labels[idx]}

    def val_batches(self, n: int) -> list[dict[str, torch.Tensor]]:
        (images, labels), b = self.val, self.val_batch_size
        return [{"images": images[i:i + b], "labels": labels[i:i + b].long()}
                for i in range(0, min(len(images), n * b), b)]


# --------------------------------------------------------------------------------------- recipes

class ImageDataConfig(Spec):
    """The recipe's `data:` section for image families (vae, gan, diffusion, classifier)."""

    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    exclude_classes: list[str] = Field(default_factory=list)  # held out of train and val (anomaly study)
    val_batch_size: int | None = rng(None, min=1, help="default: train.batch_size")


def load_image_data(dataset: str | Path, data: dict | None, batch_size: int, seed: int
                    ) -> tuple[ImageDataset, ImageBatches, ImageDataConfig]:
    """Dataset + DataSource for a recipe: `load_image_data(r.dataset, r.data, r.train.batch_size, r.train.seed)`."""
    cfg = from_dict(ImageDataConfig, data, "data")
    ds = ImageDataset(dataset)
    exclude = [ds.class_index(c) for c in cfg.exclude_classes]
    if len(exclude) >= ds.num_classes:
        raise ConfigError(f"data.exclude_classes: excludes every class of {ds.path}")
    train = ds.split("train", exclude)
    val = ds.split("val", exclude)
    batches = ImageBatches(*train, batch_size, seed, cfg.augment, val=val, val_batch_size=cfg.val_batch_size)
    return ds, batches, cfg


# --------------------------------------------------------------------------------------- output

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float N x C x H x W -> uint8 N x H x W x C (C squeezed when 1)."""
    arr = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    arr = arr.transpose(0, 2, 3, 1)
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1,
                    pad: int = 1, *, label: dict | None = None, labelling: ImageLabelling | None = None) -> Path:
    """Save [-1, 1] images as one PNG grid (nearest-neighbour upscaled by `scale`), written atomically.

    The PNG always carries the AIGC label (data/image_labels.py): `label`, or one naming the run the file
    is written into. `labelling` adds the visible label / invisible mark (off by default: training and
    eval grids are for the people training)."""
    from PIL import Image

    arr = to_uint8(images)
    n = len(arr)
    if n == 0:
        raise DataError("no images to save")
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    h, w = arr.shape[1:3]
    shape = (ncol * (h + pad) + pad, nrow * (w + pad) + pad) + arr.shape[3:]
    grid = np.zeros(shape, dtype=np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    labelling = labelling or ImageLabelling()
    if label is None:
        label = aigc_label(labelling.producer, **run_fields(path), attributes={"layout": "grid", "images": n})
    return save_png(path, img, label, labelling.visible, labelling.mark)
