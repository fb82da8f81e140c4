"""`genforge detect text|image`: is this content generated? The watermark and label detectors
(parse -> call -> print). Kept apart from cli.py; `build_parser` there calls `add_detect_commands`."""

from __future__ import annotations

import argparse

# ---------------------------------------------------------------- text (keyed green-list watermark)


def add_watermark_flags(parser: argparse.ArgumentParser) -> None:
    """The text watermark and label flags `genforge serve` and `genforge generate` share."""
    from genforge.models.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, KEY_ENV

    g = parser.add_argument_group("labelling: a keyed green-list watermark on generated text (Kirchenbauer et al.)")
    g.add_argument("--watermark", default=None, metavar="KEY",
                   help=f"watermark generated text with this secret (visible in the process list: prefer "
                   f"--watermark-key-file or {KEY_ENV})")
    g.add_argument("--watermark-key-file", default=None, metavar="PATH", help="file holding the watermark secret")
    g.add_argument("--watermark-gamma", type=float, default=None, metavar="G",
                   help=f"green share of the vocabulary (default {DEFAULT_GAMMA})")
    g.add_argument("--watermark-delta", type=float, default=None, metavar="D",
                   help=f"logit bonus of green tokens (default {DEFAULT_DELTA}; more: easier to detect, "
                   "higher perplexity)")
    g.add_argument("--label-text", default=None, metavar="TEXT",
                   help="an explicit label appended to every generated text, e.g. ' [AI-generated]'")


def watermark_from_args(a: argparse.Namespace):
    """The TextWatermark the flags (or GENFORGE_WATERMARK_KEY) ask for; None when no key is given."""
    from genforge.common.errors import ConfigError
    from genforge.models.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, TextWatermark, resolve_key

    key = resolve_key(a.watermark, a.watermark_key_file)
    if key is None:
        for flag, value in (("--watermark-gamma", a.watermark_gamma), ("--watermark-delta", a.watermark_delta)):
            if value is not None:
                raise ConfigError(f"{flag} needs a key: give --watermark KEY, --watermark-key-file or "
                                  f"GENFORGE_WATERMARK_KEY", param=flag[2:].replace("-", "_"))
        return None
    return TextWatermark(key, gamma=DEFAULT_GAMMA if a.watermark_gamma is None else a.watermark_gamma,
                         delta=DEFAULT_DELTA if a.watermark_delta is None else a.watermark_delta)


def _texts(a: argparse.Namespace) -> list[str]:
    """The texts to score: the TEXT argument, or one per line of --jsonl (its --field)."""
    from genforge.common.errors import GenforgeError

    if (a.text is None) == (a.jsonl is None):
        raise GenforgeError("detect text: give the text to score, or --jsonl FILE (not both)")
    if a.text is not None:
        return [a.text]
    from genforge.data.jsonl import read_records

    texts = []
    for n, row in read_records(a.jsonl, "--jsonl", param="jsonl"):
        value = row.get(a.field)
        if not isinstance(value, str):
            raise GenforgeError(f"--jsonl {a.jsonl}:{n}: no string field {a.field!r} (pick the field with --field)",
                                param="field")
        texts.append(value)
    if not texts:
        raise GenforgeError(f"--jsonl {a.jsonl}: the file holds no rows")
    return texts


def cmd_detect_text(a: argparse.Namespace) -> None:
    import json

    from genforge.common.errors import GenforgeError
    from genforge.models.watermark import (
        DEFAULT_GAMMA,
        TextWatermark,
        check_min_tokens,
        detect_text,
        resolve_key,
    )

    key = resolve_key(a.key, a.key_file)
    if key is None:
        raise GenforgeError("detect text: no key; give --key KEY, --key-file PATH or GENFORGE_WATERMARK_KEY",
                            param="key")
    wm = TextWatermark(key, gamma=DEFAULT_GAMMA if a.gamma is None else a.gamma)
    check_min_tokens(a.min_tokens, "--min-tokens")
    texts = _texts(a)
    from genforge.models.lm import load_tokenizer

    tokenizer = load_tokenizer(a.model)
    for text in texts:
        result = detect_text(text, tokenizer, wm, a.min_tokens, a.z_threshold)
        print(json.dumps(result.as_dict()) if a.json else result.summary())


def _add_text(de) -> None:
    from genforge.models.watermark import DEFAULT_MIN_TOKENS, DEFAULT_Z_THRESHOLD

    t = de.add_parser("text", help="score text for genforge's keyed green-list watermark")
    t.add_argument("text", nargs="?", default=None, help="the text to score (or --jsonl FILE)")
    t.add_argument("--model", required=True, metavar="RUN_OR_FOLDER",
                   help="the run or model folder whose tokenizer generated the text")
    t.add_argument("--key", default=None, help="the watermark secret (or --key-file, or GENFORGE_WATERMARK_KEY)")
    t.add_argument("--key-file", default=None, metavar="PATH", help="file holding the watermark secret")
    t.add_argument("--jsonl", default=None, metavar="FILE", help="score every row of a .jsonl file")
    t.add_argument("--field", default="text", help="the --jsonl rows' text field (default: text)")
    t.add_argument("--gamma", type=float, default=None, help="the green share the text was generated with")
    t.add_argument("--z-threshold", type=float, default=DEFAULT_Z_THRESHOLD,
                   help=f"z at or above which the verdict is watermarked (default {DEFAULT_Z_THRESHOLD:g})")
    t.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS,
                   help=f"fewest scored tokens for a verdict (default {DEFAULT_MIN_TOKENS}; fewer: too_short)")
    t.add_argument("--json", action="store_true", help="one JSON object per input instead of a line of text")
    t.set_defaults(func=cmd_detect_text)


# ---------------------------------------------------------------- images (metadata label, invisible mark)


def _describe_image(name: str, r: dict, key_given: bool) -> list[str]:
    lines = [f"{name}: {r['format']} {r['size'][0]}x{r['size'][1]}"]
    meta = r["metadata"]
    if meta is None:
        lines.append("  label: no AIGC metadata")
    else:
        aigc, extra = meta["aigc"], meta["aigc"].get("genforge") or {}
        generated = "AI-generated" if str(aigc.get("Label")) == "1" else f"Label={aigc.get('Label')!r}"
        lines.append(f"  label: {generated} (in {', '.join(meta['found_in'])}); producer {aigc.get('ContentProducer')}"
                     f", content id {aigc.get('ProduceID')}")
        lines.append(f"  model {extra.get('model')}, run {extra.get('run')}, family {extra.get('family')}, "
                     f"created {extra.get('created')}")
        if meta.get("consistent") is False:
            lines.append("  warning: the PNG text chunk and the XMP disagree (edited after labelling?)")
        if r["pixels_match"] is not None:
            lines.append("  pixels: " + ("unchanged since labelling" if r["pixels_match"]
                                         else "CHANGED since labelling (the label's pixel hash does not match)"))
    wm = r["watermark"]
    if wm is not None:
        if wm["verdict"] == "watermarked":
            crop = wm["hypothesis"].get("crop")
            where = f", as a crop of a {crop['original_size'][1]}x{crop['original_size'][0]} image" if crop else ""
            lines.append(f"  watermark: present for this key (z={wm['z_score']:.2f}, p={wm['p_value']:.2e}{where})")
        else:
            lines.append(f"  watermark: no watermark for this key (z={wm['z_score']:.2f}, p={wm['p_value']:.2g})")
    elif not key_given:
        lines.append("  watermark: not checked (give --key or --key-file)")
    return lines


def cmd_detect_image(a: argparse.Namespace) -> None:
    import json

    from genforge.data.image_labels import detect_image, resolve_key

    key = resolve_key(a.key, a.key_file, flag="--key", file_flag="--key-file")
    results = {f: detect_image(f, key) for f in a.files}  # every file checked before anything is printed
    if a.json:
        print(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2, ensure_ascii=False))
        return
    for f, r in results.items():
        print("\n".join(_describe_image(f, r, key is not None)))


def _add_image(de) -> None:
    i = de.add_parser("image", help="read an image's AIGC metadata label and check its invisible watermark")
    i.add_argument("files", nargs="+", metavar="FILE", help="PNG or JPEG files")
    i.add_argument("--key", default=None, help="the watermark key the images were generated with")
    i.add_argument("--key-file", default=None, metavar="PATH", help="file whose first line is the key")
    i.add_argument("--json", action="store_true", help="one JSON object per file (keyed by file for several)")
    i.set_defaults(func=cmd_detect_image)


def add_detect_commands(sub) -> None:
    de = sub.add_parser("detect", help="detect genforge's labels and watermarks in text and images")
    group = de.add_subparsers(dest="detect_command", required=True)
    _add_text(group)
    _add_image(group)
