"""False positives of the injection guard on technical text a user pastes: documentation and code.

The guard's labelled sets (benchmarks/data/guard_injection.jsonl) are prompts and documents written for
the guard; none is a slice of reference documentation or source code. This scores three such sources with
the shipped guard (rules + detector at its threshold), every text a window cut at a fixed stride, as a user
pastes a piece of a page:

- pydoc: CPython's reference documentation (`pydoc_data.topics`, the built-in corpus), ~300-character windows;
- docstrings: the docstrings of numpy's public functions (another author, another style), first ~300 chars;
- code: Python source of standard-library modules, ~300-character windows.

Each text is scored as it is and behind a question ("Explain this:\\n\\n" + text), the way it reaches a chat.
Then recall: the same windows with an attack planted on a line of its own (as a code comment in code), the
attacks being fresh3's hidden and direct ones (the held-out set written blind; never trained on). Prints the
share flagged per source (detector, rules, either) and writes the flagged texts to the JSON.
None of these sources is in the guard's training data (its "tech" rows come from other modules:
benchmarks/guard_tech_snippets.py).

    .venv/bin/python benchmarks/guard_docs.py [--per-source 200] [--out benchmarks/results/guard_docs.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

from _common import cpu_info, git_commit, md_table, versions

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 300


def windows(text: str, n: int) -> list[str]:
    """n windows of ~WINDOW characters at a fixed stride, each widened to whole words."""
    step = max(WINDOW, (len(text) - WINDOW) // n)
    out = []
    for i in range(n):
        start = i * step
        if start + WINDOW > len(text):
            break
        a = text.rfind(" ", 0, start) + 1 if start else 0
        b = text.find(" ", start + WINDOW)
        out.append(text[a: b if b > 0 else None].strip())
    return out


def pydoc_texts(n: int) -> list[str]:
    from pydoc_data.topics import topics

    return windows("\n\n".join(topics[k] for k in sorted(topics)), n)


def numpy_docstrings(n: int) -> list[str]:
    import numpy as np

    docs = []
    for name in sorted(dir(np)):
        obj = getattr(np, name, None)
        doc = inspect.getdoc(obj) if callable(obj) and not name.startswith("_") else None
        if doc and len(doc) > 200 and doc not in docs:
            docs.append(doc)
    step = max(1, len(docs) // n)
    return [d[:WINDOW].rsplit(" ", 1)[0] for d in docs[::step][:n]]


def stdlib_code(n: int) -> list[str]:
    import argparse as m1
    import collections as m2
    import json.decoder as m3
    import pathlib as m4
    import textwrap as m5

    return windows("\n\n".join(inspect.getsource(m) for m in (m1, m2, m3, m4, m5)), n)


def planted(texts: list[str], code: bool, seed: int = 0) -> list[str]:
    """Each text with one of fresh3's attacks on a line of its own (a comment in code)."""
    import random

    from genforge.jobs import guard_data_fresh3 as fresh3

    attacks = fresh3.HIDDEN + fresh3.ATTACKS["direct"]
    rng = random.Random(seed)
    out = []
    for t in texts:
        lines = t.split("\n")
        at = rng.randint(1, max(1, len(lines) - 1))
        out.append("\n".join(lines[:at] + [("# " if code else "") + rng.choice(attacks)] + lines[at:]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-source", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guard_docs.json"))
    a = p.parse_args()
    if a.per_source < 1:
        p.error(f"--per-source must be at least 1, got {a.per_source}")

    from genforge.models.embeddings import Embedder
    from genforge.serve.guard import Guard

    t0 = time.perf_counter()
    guard = Guard("redact", embedder=Embedder())
    sources = {"pydoc": pydoc_texts(a.per_source), "numpy docstrings": numpy_docstrings(a.per_source),
               "stdlib code": stdlib_code(a.per_source)}
    rows, results, flagged = [], {}, {}
    cases = [(name, framing, [wrap(t) for t in texts]) for name, texts in sources.items()
             for framing, wrap in (("as pasted", lambda t: t), ("behind a question", lambda t: "Explain this:\n\n" + t))]
    cases += [(name, "attack planted (recall)", planted(texts, code=name == "stdlib code"))
              for name, texts in sources.items()]
    for name, framing, texts in cases:
        scans = guard.scan(texts)
        det = [s.detector_score >= guard.threshold for s in scans]
        rules = [bool(s.rules) for s in scans]
        either = [s.injection for s in scans]
        key = f"{name}, {framing}"
        results[key] = {"texts": len(texts), "detector": sum(det) / len(texts), "rules": sum(rules) / len(texts),
                        "flagged": sum(either) / len(texts), "flagged_n": sum(either)}
        show = [(t, s) for t, s in zip(texts, scans) if s.injection != (framing.startswith("attack"))]
        flagged[key + (", missed" if framing.startswith("attack") else ", flagged")] = [
            {"text": t, "detector_score": round(s.detector_score, 3), "rules": s.rules} for t, s in show]
        rows.append([name, framing, len(texts), f"{results[key]['detector']:.1%}", f"{results[key]['rules']:.1%}",
                     f"{results[key]['flagged']:.1%}"])
    table = md_table(["source", "text", "texts", "detector", "rules", "flagged (either)"], rows)
    print(f"guard at its shipped threshold {guard.threshold:.3f}; ~{WINDOW}-character windows\n\n{table}")
    record = {"benchmark": "guard_docs", "threshold": guard.threshold, "window_chars": WINDOW,
              "settings": vars(a), "results": results, "errors": flagged, "table": table,
              "cpu": cpu_info(), "versions": versions("torch", "sentence-transformers", "numpy"),
              "git_commit": git_commit(ROOT), "wall_seconds": time.perf_counter() - t0}
    out = Path(a.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
