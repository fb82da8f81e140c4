"""`genforge detect text|image`: is this content generated? The watermark and label detectors
(parse -> call -> print). Kept apart from cli.py; `build_parser` there calls `add_detect_commands`."""

from __future__ import annotations

import argparse

# ---------------------------------------------------------------- text (keyed green-list watermark)


def cmd_detect_text(a: argparse.Namespace) -> None:
    raise NotImplementedError  # issue 12, text part


def _add_text(de) -> None:
    t = de.add_parser("text", help="score text for genforge's keyed green-list watermark")
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
