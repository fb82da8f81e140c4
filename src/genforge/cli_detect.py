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


def cmd_detect_image(a: argparse.Namespace) -> None:
    raise NotImplementedError  # issue 12, image part


def _add_image(de) -> None:
    i = de.add_parser("image", help="read an image's AIGC metadata label and check its invisible watermark")
    i.set_defaults(func=cmd_detect_image)


def add_detect_commands(sub) -> None:
    de = sub.add_parser("detect", help="detect genforge's labels and watermarks in text and images")
    group = de.add_subparsers(dest="detect_command", required=True)
    _add_text(group)
    _add_image(group)
