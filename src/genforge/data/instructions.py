"""A small built-in instruction set derived from the CPython docs corpus (`pydoc_data.topics`).

Each topic that opens with a prose paragraph (all but the special-method pages) gives a few chat
rows: a question about the topic, in a few phrasings -> the topic's opening paragraph (and for
preference training, that paragraph preferred over another topic's). It ships
with Python, so SFT recipes, tests and the fine-tuning demo run anywhere without a download; the
demo's base model was pre-trained on the same corpus, so the answers are text it has seen, now in
a question -> answer format.
"""

from __future__ import annotations

import random
import re
from pydoc_data.topics import topics

QUESTIONS = (
    "What does the Python documentation say about {subject}?",
    "Explain {subject} in Python.",
    "Give me a short description of {subject}.",
)
MAX_ANSWER_CHARS = 360  # a couple of sentences: fits a 128-token demo context with the question


def _title(text: str) -> str:
    """'The "assert" statement' from the heading line of a topic."""
    return text.strip().splitlines()[0].strip()


def opening_paragraph(text: str) -> str | None:
    """The first prose paragraph of a topic: not its heading, not an indented grammar or code
    block, not a signature or version note; lines joined, cut at a sentence end near
    MAX_ANSWER_CHARS, a closing colon (which introduced a grammar block) made a full stop. None
    when the topic has none (the special-method pages start with signatures)."""
    for block in re.split(r"\n\s*\n", text.strip())[1:]:  # the first block is the heading
        lines = block.splitlines()
        if (lines[0].startswith((" ", "\t", "**", "object.", "New in version", "Changed in version"))
                or (len(lines) > 1 and set(lines[1].strip()) <= set("=-*~^")) or len(block.split()) < 8):
            continue
        paragraph = re.sub(r"-\n", "-", "\n".join(line.strip() for line in lines)).replace("\n", " ")
        if len(paragraph) > MAX_ANSWER_CHARS:
            cut = paragraph.rfind(". ", 0, MAX_ANSWER_CHARS)
            paragraph = paragraph[:cut + 1] if cut > 0 else paragraph[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0]
        return paragraph[:-1] + "." if paragraph.endswith(":") else paragraph
    return None


def _topics() -> list[tuple[str, str, str]]:
    """(topic key, subject as a question names it, opening paragraph) of every prose topic."""
    out, seen = [], set()
    for key in sorted(topics):
        title, answer = _title(topics[key]), opening_paragraph(topics[key])
        if answer is None or title in seen:  # "else" repeats the "if" topic
            continue
        seen.add(title)
        out.append((key, "the" + title[3:] if title.startswith("The ") else title, answer))
    return out


def pydoc_instructions(seed: int = 0) -> list[dict]:
    """Chat rows `{"messages": [user, assistant], "topic": key}`, every topic in every phrasing,
    shuffled by `seed`. The topic key lets a caller hold out whole topics."""
    rows = [{"messages": [{"role": "user", "content": question.format(subject=subject)},
                          {"role": "assistant", "content": answer}], "topic": key}
            for key, subject, answer in _topics() for question in QUESTIONS]
    random.Random(seed).shuffle(rows)
    return rows


def split_topics(seed: int = 0, heldout: int = 12, dev: int = 8) -> dict[str, list[str]]:
    """Topic keys of the built-in sets as {"heldout", "dev", "train"}, a seeded shuffle: the
    fine-tuning demo's split (jobs/demo_finetune.py), which the pydoc-qa suite labels its items with."""
    keys = sorted({row["topic"] for row in pydoc_instructions()})
    random.Random(seed).shuffle(keys)
    return {"heldout": sorted(keys[:heldout]), "dev": sorted(keys[heldout:heldout + dev]),
            "train": sorted(keys[heldout + dev:])}


def pydoc_preferences(seed: int = 0) -> list[dict]:
    """Preference rows `{"prompt", "chosen", "rejected", "topic"}`: a question about a topic, its
    opening paragraph (chosen) and another topic's, drawn at random (rejected); every topic in
    every phrasing, shuffled by `seed`."""
    entries = _topics()
    rand = random.Random(seed)
    rows = []
    for i, (key, subject, answer) in enumerate(entries):
        for question in QUESTIONS:
            other = entries[(i + rand.randrange(1, len(entries))) % len(entries)][2]  # never the topic itself
            rows.append({"prompt": question.format(subject=subject), "chosen": answer, "rejected": other,
                         "topic": key})
    rand.shuffle(rows)
    return rows
