"""The guard's technical training rows (source "tech"): documentation and code that users paste, benign as it
is and with an attack planted in it.

Before these rows the detector flagged 8-15% of pasted documentation and code as prompt injection
(benchmarks/guard_docs.py): no training text looked like a docstring, a parameter table or a function
body, so their odd tokens read as an attack. Each snippet of `guard_tech.json` (docstrings and source
windows of torch, scipy, scikit-learn and the standard library; benchmarks/guard_tech_snippets.py wrote
it) gives two rows: the snippet as a user sends it (pasted alone, behind a question, or fenced), and the
same message with an attack planted on a line of its own, as a code comment or a docstring line. The pair
differs only in the attack, so the detector learns the attack, not "code is benign". Every snippet's
origin (module) is its template: cross-validation holds a module's rows out together.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from genforge.jobs import guard_data_fresh as fresh
from genforge.jobs import guard_data_fresh2 as fresh2
from genforge.jobs import guard_data_wide as wide
from genforge.jobs.guard_data import ATTACKS, BENIGN_DOC_EXTRA, HIDDEN, fill

SNIPPETS = Path(__file__).with_name("guard_tech.json")

QUESTIONS = [
    "Explain this:", "What does this do?", "Can you review this code?", "Why does this raise an error?",
    "Summarise this for a beginner:", "Rewrite this docstring in plain English:", "Is there a bug here?",
    "Add type hints to this:", "Write a unit test for this:", "What do the parameters mean?",
    "How would I call this from my script?", "请解释这段代码：", "这段文档是什么意思？",
]

# Planted attacks, from training data only: v1's training templates (v1 holds every fourth template of a
# category out for its test split) and the written training sets' hidden and direct attacks. With v1's
# templates alone, attacks planted in held-out documentation were found 80-86% of the time (benchmarks/
# guard_docs.py), against 92-94% before these rows: a dozen templates taught too narrow an attack.
_TEMPLATES = [t for i, t in enumerate(HIDDEN) if i % 4 != 3] + [t for i, t in enumerate(ATTACKS["direct"]) if i % 4 != 3]
_WRITTEN = [*fresh.HIDDEN, *fresh.ATTACKS["direct"], *fresh2.HIDDEN, *fresh2.ATTACKS["direct"],
            *wide.ATTACKS["hidden"], *wide.ATTACKS["direct"], *wide.ATTACKS["chinese"]]
# Benign lines full of trigger words ("ignore the previous ...", "override the default ..."), as comments and
# notes in real code say them: half the benign rows carry one where their pair carries the attack.
_BENIGN_LINES = [*BENIGN_DOC_EXTRA, *fresh.BENIGN_PLANTED, *fresh2.BENIGN_PLANTED]


def _frame(rng: random.Random, text: str, kind: str) -> str:
    r = rng.random()
    if r < 0.4:
        return text
    q = rng.choice(QUESTIONS)
    if r < 0.7 or kind != "code":
        return f"{q}\n\n{text}"
    return f"{q}\n\n```python\n{text}\n```"


def _plant(text: str, kind: str, line: str, at: int, prefix: str) -> str:
    """`line` inserted before line `at` of `text` (a comment, indented as the line above, in code)."""
    lines = text.split("\n")
    if kind == "code":
        indent = lines[at - 1][: len(lines[at - 1]) - len(lines[at - 1].lstrip())]
        line = indent + prefix + line
    return "\n".join(lines[:at] + [line] + lines[at:])


def tech_rows(rng: random.Random) -> list[dict]:
    """Two training rows per snippet: benign ("benign_technical") and with a planted attack ("hidden")."""
    snippets = json.loads(SNIPPETS.read_text(encoding="utf-8"))["snippets"]
    rows = []
    for s in snippets:
        framing = rng.random()  # the same framing (and question) for both rows of a snippet
        attack = fill(rng.choice(_TEMPLATES), rng) if rng.random() < 0.3 else rng.choice(_WRITTEN)
        at = rng.randint(1, max(1, s["text"].count("\n")))
        prefix = rng.choice(["# ", "# NOTE: ", "# TODO: "])
        text = _plant(s["text"], s["kind"], rng.choice(_BENIGN_LINES), at, prefix) if rng.random() < 0.5 else s["text"]
        benign = _frame(random.Random(framing), text, s["kind"])
        attack = _frame(random.Random(framing), _plant(s["text"], s["kind"], attack, at, prefix), s["kind"])
        for text, label, cat in ((benign, 0, "benign_technical"), (attack, 1, "hidden")):
            rows.append({"text": text, "label": label, "category": cat, "split": "train",
                         "template": f"tech/{s['origin']}", "source": "tech"})
    return rows
