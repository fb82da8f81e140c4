"""How genforge scales, one section per claim (`--only SECTION`, repeatable; every section by default).

- distributed: one LM recipe on 1 process (1 and N threads) and on N torchrun processes (DDP, FSDP2);
  benchmarks/scale_distributed.py.
- onnx: PyTorch vs onnxruntime fp32 and int8, LM decode tokens/s and diffusion images/s;
  benchmarks/scale_onnx.py.
- canary: switching model versions under load inside one server (registry promote / rollback) against
  restarting it; benchmarks/scale_canary.py.

    .venv/bin/python benchmarks/scale.py --only distributed [--steps 40 --rounds 3 | --quick]
    .venv/bin/python benchmarks/scale.py --only onnx [--threads 1] [--repeats 5]
    .venv/bin/python benchmarks/scale.py --only canary [--canary-clients 8] [--canary-duration 60]

Writes benchmarks/results/scale_<section>.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_info, git_commit, versions  # noqa: E402
from scale_canary import add_canary_args, canary_section, print_canary  # noqa: E402
from scale_distributed import add_distributed_args, print_distributed, section_distributed  # noqa: E402
from scale_onnx import add_onnx_args, onnx_section, print_onnx  # noqa: E402

SECTIONS = {"distributed": (section_distributed, print_distributed, ("torch", "transformers")),
            "onnx": (onnx_section, print_onnx, ("torch", "transformers", "diffusers", "onnx", "onnxruntime",
                                                "onnxscript")),
            "canary": (canary_section, print_canary, ("torch", "transformers", "fastapi", "uvicorn", "httpx"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(SECTIONS), action="append", default=None, help="run only these sections")
    add_distributed_args(ap)
    add_onnx_args(ap)
    add_canary_args(ap)
    a = ap.parse_args()
    for section in a.only or list(SECTIONS):
        print(f"## {section}", flush=True)
        run, show, packages = SECTIONS[section]
        cpu = cpu_info()  # the load average before the section starts
        result = run(a)
        result.update(section=section, cpu=cpu, versions=versions(*packages), git_commit=git_commit(ROOT),
                      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        show(result)
        RESULTS.mkdir(parents=True, exist_ok=True)
        quick = "_quick" if section == "distributed" and a.quick else ""
        path = RESULTS / f"scale_{section}{quick}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
