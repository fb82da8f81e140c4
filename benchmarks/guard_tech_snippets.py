"""Writes src/genforge/jobs/guard_tech.json: windows of documentation and source code, the guard's benign
technical training text (`jobs/guard_data_tech.py` turns them into rows). Run once; the file is committed,
so the labelled sets do not depend on the versions installed where they are rebuilt.

Before this text the shipped detector flagged 8-15% of documentation and code windows as prompt injection
(benchmarks/guard_docs.py). The sources here are disjoint from the ones guard_docs.py measures on (pydoc
topics, numpy's docstrings, the source of argparse, collections, json.decoder, pathlib and textwrap), so
that benchmark stays held out:

- docstrings of torch (nn, optim, utils.data), scipy (stats, signal, sparse, optimize) and scikit-learn
  (linear_model, model_selection, preprocessing) public objects, and of stdlib modules (os, subprocess,
  shutil, re, logging, datetime, itertools, functools);
- ~300-character windows of the source of email.message, http.client, logging, shutil, tarfile,
  unittest.case, asyncio.base_events and zipfile.

    .venv/bin/python benchmarks/guard_tech_snippets.py
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "genforge" / "jobs" / "guard_tech.json"
WINDOW = 300
DOC_MODULES = ["torch.nn", "torch.optim", "torch.utils.data", "scipy.stats", "scipy.signal", "scipy.sparse",
               "scipy.optimize", "sklearn.linear_model", "sklearn.model_selection", "sklearn.preprocessing",
               "os", "subprocess", "shutil", "re", "logging", "datetime", "itertools", "functools"]
CODE_MODULES = ["email.message", "http.client", "logging", "shutil", "tarfile", "unittest.case",
                "asyncio.base_events", "zipfile"]
PER_DOC_MODULE = 14
PER_CODE_MODULE = 30


def _cut(text: str) -> str:
    """The first ~WINDOW characters, ended at a word."""
    return text if len(text) <= WINDOW else text[:WINDOW].rsplit(" ", 1)[0]


def docstrings(module: str, n: int) -> list[str]:
    mod = importlib.import_module(module)
    docs = []
    for name in sorted(dir(mod)):
        if name.startswith("_"):
            continue
        obj = getattr(mod, name, None)
        doc = inspect.getdoc(obj) if callable(obj) else None
        if doc and len(doc) > 150 and _cut(doc) not in docs:
            docs.append(_cut(doc))
    step = max(1, len(docs) // n)
    return docs[::step][:n]


def code_windows(module: str, n: int) -> list[str]:
    src = inspect.getsource(importlib.import_module(module))
    lines = src.splitlines(keepends=True)
    step = max(1, len(lines) // n)
    out = []
    for i in range(0, len(lines), step):
        chunk, j = "", i
        while j < len(lines) and len(chunk) < WINDOW:
            chunk += lines[j]
            j += 1
        chunk = chunk.strip("\n")
        if len(chunk) > 80 and chunk not in out:
            out.append(chunk)
    return out[:n]


def main() -> None:
    snippets = [{"kind": "docstring", "origin": m, "text": t} for m in DOC_MODULES for t in docstrings(m, PER_DOC_MODULE)]
    snippets += [{"kind": "code", "origin": m, "text": t} for m in CODE_MODULES for t in code_windows(m, PER_CODE_MODULE)]
    record = {"about": "windows of documentation and source code (benchmarks/guard_tech_snippets.py wrote them), "
                       "the guard's benign technical training text; from the docstrings and source of torch "
                       "(BSD-3), scipy (BSD-3), scikit-learn (BSD-3) and CPython (PSF)",
              "python": sys.version.split()[0], "snippets": snippets}
    OUT.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    by = {}
    for s in snippets:
        by[s["kind"]] = by.get(s["kind"], 0) + 1
    print(f"wrote {OUT}: {len(snippets)} snippets {by}")


if __name__ == "__main__":
    main()
