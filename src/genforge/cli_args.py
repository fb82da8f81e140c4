"""Argument types and small lookups shared by the `genforge` subcommands (cli.py, cli_eval.py, ...)."""

from __future__ import annotations

import argparse

from genforge.common.errors import GenforgeError


def run_family(run_path: str) -> str:
    """'lm', 'vae', 'gan', 'diffusion', ... for a run dir ('lm' for a fine-tuned LM too); 'lm' for a
    plain HF model folder."""
    from genforge.common.runs import RunDir

    run = RunDir(run_path)
    if run.recipe_path.is_file():
        from genforge.common.config import IMAGE_FAMILIES

        family = str(run.read_recipe().get("family", "lm"))
        return family if family in IMAGE_FAMILIES else "lm"
    if not run.path.exists():
        raise GenforgeError(f"not found: {run_path} (expected a run directory or a model folder)")
    return "lm"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def positive_float(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return value


def non_negative_float(text: str) -> float:
    value = number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def trace_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--trace", choices=["off", "console", "otlp"], default="off",
                        help=f"OpenTelemetry spans of {what}: console (JSON lines on stdout) or otlp (to "
                        "OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, default http://localhost:4318); service.name genforge")


