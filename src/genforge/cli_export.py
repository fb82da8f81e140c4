"""`genforge export RUN --format onnx [--out DIR] [--quantize int8]`, and how `generate` picks its backend.

parse -> call -> print (jobs/export.py does the work)."""

from __future__ import annotations

import argparse

from genforge.cli_args import positive_int
from genforge.common.errors import GenforgeError

BACKENDS = ("torch", "onnxruntime")


def cmd_export(a: argparse.Namespace) -> None:
    from genforge.jobs.export import export_run

    r = export_run(a.run, a.format, a.out, quantize=a.quantize, opset=a.opset)
    print(f"{r['kind']} ({r['model']}) exported to {r['out']} (onnx opset {r['opset']}"
          f"{', int8 dynamic quantization' if r['quantization'] else ''})")
    for key, value in r["parity"].items():
        print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"generate with: genforge generate {r['out']} "
          + ("--prompt TEXT" if r["kind"] in ("causal-lm", "text-unet") else "--num-samples 16 --out grid.png"))


def add_export_command(sub) -> None:
    ex = sub.add_parser("export", help="export a run's LM or diffusion UNet to ONNX (onnxruntime generates from it)")
    ex.add_argument("run", help="a run directory, or a Hugging Face causal-LM / diffusion model folder")
    ex.add_argument("--format", default="onnx", help="export format (onnx)")
    ex.add_argument("--out", default=None, help="new folder for the export (default: RUN/onnx, where "
                    "`generate RUN --backend onnxruntime` looks)")
    ex.add_argument("--quantize", default=None, metavar="int8",
                    help="int8: onnxruntime's dynamic quantization of the exported graph (int8 weights)")
    ex.add_argument("--opset", type=positive_int, default=18, help="ONNX opset (default 18)")
    ex.set_defaults(func=cmd_export)


def add_backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="torch, or onnxruntime: the export `genforge export` wrote (RUN/onnx, or RUN is the "
                        "export folder; default for an export folder)")


def resolve_backend(a: argparse.Namespace) -> tuple[str, str | None]:
    """(backend, what the export holds: causal-lm | unet | text-unet, None for torch) for `generate`."""
    from genforge.models.onnx_runtime import find_export, is_export_folder, read_export

    exported = is_export_folder(a.run)
    backend = a.backend or ("onnxruntime" if exported else "torch")
    if backend == "torch":
        if exported:
            raise GenforgeError(f"generate: {a.run} is an ONNX export; it runs on onnxruntime (leave out --backend, "
                                "or give the run it came from for --backend torch)", param="--backend")
        return backend, None
    return backend, read_export(find_export(a.run))["kind"]
