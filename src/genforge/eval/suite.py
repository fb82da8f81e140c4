"""Evaluation suites: a JSONL file of prompts and references, answered by a model and scored.

    {"prompt": "The capital of France is", "reference": "Paris."}
    {"messages": [{"role": "user", "content": "What does `pass` do?"}], "reference": "Nothing.",
     "labels": {"topic": "pass"}}

A `prompt` is tokenized as `genforge serve`'s /v1/completions does (the tokenizer's own special
tokens added); `messages` are rendered with the model's chat template as /v1/chat/completions and
SFT render them (data/chat_template.py), the assistant turn opened. The answers come from the
batching engine's generator (models/generation.py), greedy unless a temperature is given; each
is scored against its reference (eval/text_metrics.py), and the reference's perplexity given the
prompt says how likely the model finds the right answer whatever it generated.

`builtin:pydoc-qa` is a suite from built-in data: one question per CPython docs topic, answered by
the topic's opening paragraph (the fine-tuning demo's task), each labelled with the demo's split.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genforge.common.errors import DataError
from genforge.common.progress import progress_bar
from genforge.data.chat_template import render_messages
from genforge.data.instructions import pydoc_instructions, split_topics
from genforge.eval.lm import continuation_nll
from genforge.eval.rag import SuiteSources
from genforge.eval.text_metrics import score_texts
from genforge.models.generation import SamplingParams, generate_many
from genforge.models.lm import context_length, load_lm, resolve_chat_template

BUILTIN_SUITES = ("pydoc-qa",)


@dataclass
class SuiteItem:
    """One suite line: a plain `prompt` or chat `messages` (exactly one), and the reference."""

    where: str  # "FILE line N", for error messages
    reference: str
    prompt: str | None = None
    messages: list[dict] | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict:
        """The item as it appears in results.jsonl."""
        asked = {"prompt": self.prompt} if self.messages is None else {"messages": self.messages}
        return {**asked, "reference": self.reference, "labels": self.labels}


@dataclass
class Settings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32  # rows the generator decodes at once

    def sampling(self, index: int) -> SamplingParams:
        # a seed per item, so a sampled answer does not depend on which items share its batch
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed + index)

    def describe(self) -> str:
        how = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}, top-p {self.top_p:g}, " \
                                                      f"seed {self.seed}"
        return f"{how}, up to {self.max_new_tokens} new tokens"


# ---------------------------------------------------------------------------------------- reading

def _parse_item(row: object, where: str) -> SuiteItem:
    expected = ('expected {"prompt": "..." or "messages": [{"role": ..., "content": ...}], "reference": "...", '
                'optional "labels": {"name": "value"}}')
    if not isinstance(row, dict):
        raise DataError(f"{where}: a suite line must be a JSON object, got {type(row).__name__}; {expected}")
    if ("prompt" in row) == ("messages" in row):
        which = "both" if "prompt" in row else "neither"
        raise DataError(f"{where}: has {which} of `prompt` and `messages` (give exactly one); {expected}")
    if "reference" not in row:
        raise DataError(f"{where}: missing `reference` (the expected answer); {expected}")
    if not isinstance(row["reference"], str):
        raise DataError(f"{where}: `reference` must be a string, got {type(row['reference']).__name__}")
    labels = row.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise DataError(f"{where}: `labels` must be an object of strings, e.g. {{\"topic\": \"loops\"}}")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise DataError(f"{where}: `prompt` must be a non-empty string, got {row['prompt']!r:.60}")
        return SuiteItem(where, row["reference"], prompt=row["prompt"], labels=labels)
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{\"role\", \"content\"}} objects")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                and isinstance(m.get("name", ""), str)):
            raise DataError(f"{where}: messages[{k}] must be an object with string `role` and `content`, "
                            f"got {json.dumps(m)[:80]}")
    return SuiteItem(where, row["reference"], messages=[dict(m) for m in messages], labels=labels)


def builtin_suite(name: str) -> list[SuiteItem]:
    """`pydoc-qa`: one question per CPython docs topic (a seeded pick among its phrasings) ->
    the topic's opening paragraph; labelled with the topic key and the fine-tuning demo's split of
    topics (`demo_split`: train, dev or heldout), so a fine-tuned model's figures can be read on
    the topics it never trained on."""
    split = {topic: part for part, topics in split_topics().items() for topic in topics}
    if name != "pydoc-qa":
        raise DataError(f"unknown built-in suite builtin:{name}; the built-in suites are "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN_SUITES))
    first: dict[str, dict] = {}
    for row in pydoc_instructions(seed=0):
        first.setdefault(row["topic"], row)
    return [SuiteItem(f"builtin:{name} item {i + 1}", row["messages"][1]["content"],
                      messages=[row["messages"][0]], labels={"topic": topic, "demo_split": split[topic]})
            for i, (topic, row) in enumerate(sorted(first.items()))]


def load_suite(source: str | Path) -> tuple[str, list[SuiteItem]]:
    """The suite's name (its file's stem, or the built-in's name) and its items; a DataError
    naming the file and line for anything malformed."""
    source = str(source)
    if source.startswith("builtin:"):
        name = source[len("builtin:"):]
        return name, builtin_suite(name)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"suite file not found: {path} (a JSONL file, or one of "
                        + ", ".join(f"builtin:{n}" for n in BUILTIN_SUITES) + ")")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        items.append(_parse_item(row, where))
    if not items:
        raise DataError(f"{path}: the suite is empty; write one JSON object per line, each with a `prompt` "
                        "(or chat `messages`) and a `reference`")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-") or "suite"
    return name, items


# ---------------------------------------------------------------------------------------- answering

def prompt_ids(tokenizer, template: str, item: SuiteItem) -> list[int]:
    """The prompt's token ids, as `genforge serve` would build them."""
    if item.messages is None:
        return list(tokenizer(item.prompt, verbose=False)["input_ids"])  # (a too-long one is counted, not warned)
    try:
        return render_messages(tokenizer, template, item.messages, add_generation_prompt=True).ids
    except DataError as e:
        raise DataError(f"{item.where}: {e.message}") from None


def reference_nll(model, prompts: list[list[int]], references: list[list[int]], on_batch=None,
                  batch_size: int = 8) -> list[tuple[float | None, int]]:
    """(mean NLL of the reference tokens given the prompt, tokens scored) per item. A reference
    running past the context is scored on the tokens that fit; an item whose prompt alone fills
    the context (or whose reference is empty) gets (None, 0)."""
    limit = context_length(model)
    pairs = {i: (p, r[:limit - len(p)]) for i, (p, r) in enumerate(zip(prompts, references))
             if len(p) < limit and r}
    order = sorted(pairs)
    nll: dict[int, float] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        nll.update(zip(chunk, continuation_nll(model, [pairs[i] for i in chunk], batch_size)))
        if on_batch is not None:
            on_batch(len(chunk))
    return [(nll[i], len(pairs[i][1])) if i in nll else (None, 0) for i in range(len(prompts))]


@torch.inference_mode()
def generate_answers(model, tokenizer, items: list[SuiteItem], settings: Settings,
                     on_finish: Callable[[int], None] | None = None) -> list[str]:
    """Each item's answer (stripped; "" where the prompt alone fills the context), generated
    through the batching engine's generator. `on_finish(i)` as each answered item i completes."""
    template = resolve_chat_template(tokenizer)
    limit = context_length(model)
    prompts = [prompt_ids(tokenizer, template, item) for item in items]
    fits = [i for i, p in enumerate(prompts) if len(p) < limit]  # room for at least one new token
    texts = generate_many(model, tokenizer, [prompts[i] for i in fits], [settings.sampling(i) for i in fits],
                          max_batch_size=settings.batch_size,
                          on_finish=None if on_finish is None else lambda k: on_finish(fits[k]))
    outputs = [""] * len(items)
    for i, text in zip(fits, texts):
        outputs[i] = text.strip()
    return outputs


@torch.inference_mode()
def answer_suite(model_path: str | Path, items: list[SuiteItem], settings: Settings, label: str,
                 sources: SuiteSources | None = None) -> dict:
    """One model's answers to the suite and their scores: {"rows", "metrics", "counts", ...}.
    With `sources` (--rag), each prompt carries the retrieved sources that fit this model's context."""
    t0 = time.perf_counter()
    model, tokenizer = load_lm(model_path)
    template = resolve_chat_template(tokenizer)
    limit = context_length(model)
    asked, placed = items, [0] * len(items)
    if sources is not None:
        asked, placed = sources.place(items, lambda it: len(prompt_ids(tokenizer, template, it)), limit,
                                      settings.max_new_tokens)
    prompts = [prompt_ids(tokenizer, template, item) for item in asked]
    references = [list(tokenizer(item.reference, add_special_tokens=False, verbose=False)["input_ids"])
                  for item in items]
    fits = sum(len(p) < limit for p in prompts)
    with progress_bar() as bar:
        task = bar.add_task(f"{label}: answering", total=fits, info=settings.describe())
        outputs = generate_answers(model, tokenizer, asked, settings, lambda _: bar.update(task, advance=1))
        task = bar.add_task(f"{label}: reference perplexity", total=len(items), info="")
        nlls = reference_nll(model, prompts, references, lambda n: bar.update(task, advance=n))
        bar.update(task, completed=len(items))
    per_item, metrics = score_texts(outputs, [item.reference for item in items])
    scored = [(v, n) for v, n in nlls if v is not None]
    tokens = sum(n for _, n in scored)
    if tokens:
        metrics["reference_nll"] = sum(v * n for v, n in scored) / tokens  # per token, over every scored token
        metrics["reference_perplexity"] = math.exp(min(metrics["reference_nll"], 50.0))
    rows = []
    for i, item in enumerate(items):
        nll, n = nlls[i]
        rows.append({"index": i, **item.row(), "output": outputs[i], "prompt_tokens": len(prompts[i]),
                     "metrics": {**per_item[i], "reference_nll": nll,
                                 "reference_perplexity": None if nll is None else math.exp(min(nll, 50.0)),
                                 "reference_tokens": n, "reference_truncated": nll is not None
                                 and n < len(references[i])},
                     **({"rag": sources.row(i, placed[i])} if sources is not None else {})})
    counts = {"items": len(items),
              "not_generated_prompt_fills_context": len(items) - fits,
              "perplexity_skipped_prompt_fills_context": sum(len(p) >= limit for p in prompts),
              "perplexity_skipped_empty_reference": sum(len(p) < limit and not r for p, r in zip(prompts, references)),
              "perplexity_reference_truncated": sum(r["metrics"]["reference_truncated"] for r in rows)}
    out = {"model": str(model_path), "context_length": limit, "rows": rows, "metrics": metrics, "counts": counts,
           "seconds": time.perf_counter() - t0}
    if sources is not None:
        out["retrieval"] = sources.metrics(placed)
    return out
