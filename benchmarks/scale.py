"""How genforge scales, one section per claim (`--only SECTION`).

canary: switching model versions under load, inside one server (registry promote / rollback) against
restarting the server on the other version; see benchmarks/scale_canary.py.

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

SECTIONS = {"canary": (canary_section, print_canary)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=list(SECTIONS), action="append", default=None, help="run only these sections")
    add_canary_args(ap)
    a = ap.parse_args()
    for section in a.only or list(SECTIONS):
        run, show = SECTIONS[section]
        result = run(a)
        result.update(cpu=cpu_info(), versions=versions("torch", "transformers", "fastapi", "uvicorn", "httpx"),
                      git_commit=git_commit(ROOT), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        show(result)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"scale_{section}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
