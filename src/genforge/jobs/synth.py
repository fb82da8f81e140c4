"""`genforge data synth --teacher RUN --prompts FILE --out data.jsonl`: SFT conversations answered by a
teacher model, deduplicated and filtered, each row saying how it was made.

    prompts    a .jsonl file with `prompt` (a user turn) or chat `messages` (ending in a user turn)
               per line, or a text file with one prompt per non-empty line
    generate   each prompt K times through the continuous-batching generator serve's engine runs
               (models/generation.py's BatchGenerator), rendered with the teacher's chat template
               exactly as `genforge serve` renders it; each row has its own seed, so a row's text does
               not depend on which rows shared its batch
    filter     in this order, each counted: answers cut off at --max-new-tokens (an SFT row teaches
               the model to end its turn where the answer ends), exact duplicates after
               normalisation (NFC, case, whitespace), answers outside [--min-chars, --max-chars], and
               answers whose perplexity under the teacher exceeds --max-perplexity
    write      {"messages": [..., {"role": "assistant", ...}], "meta": {...}} rows that data/chat.py
               reads for SFT, and data.stats.json beside them; both written to a temp file and
               renamed, so an interrupted run leaves nothing half-written
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from genforge.common.errors import ConfigError, DataError, GenforgeError
from genforge.common.progress import progress_bar
from genforge.common.runs import atomic_write_text
from genforge.data.chat import parse_messages
from genforge.data.chat_template import render_messages
from genforge.data.clean import Deduper, normalize
from genforge.data.jsonl import read_records
from genforge.eval.lm import continuation_perplexity
from genforge.models.generation import BatchGenerator, SamplingParams
from genforge.models.lm import load_lm, model_folder, resolve_chat_template


@dataclass
class Prompt:
    messages: list[dict]
    where: str  # "file:line", for errors and for each row's meta


@dataclass
class Sample:
    prompt: Prompt
    index: int  # which of the prompt's K samples
    seed: int
    prompt_ids: list[int]
    answer_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a .jsonl file (`prompt` or `messages`) or of a text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts {p} does not exist", param="prompts")
    prompts = []
    if p.suffix == ".jsonl":
        for n, row in read_records(p, "prompts file", param="prompts"):
            where = f"{p}:{n}"
            if isinstance(row.get("prompt"), str) and row["prompt"].strip():
                messages = [{"role": "user", "content": row["prompt"]}]
            elif "messages" in row:
                messages = parse_messages(row["messages"], where)
                if messages[-1]["role"] != "user":
                    raise DataError(f"{where}: the last message must be the user's turn the teacher answers, "
                                    f"got {messages[-1]['role']!r}", param="prompts")
            else:
                raise DataError(f"{where}: a prompt row needs a non-empty string `prompt` or chat `messages`",
                                param="prompts")
            prompts.append(Prompt(messages, where))
    else:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                prompts.append(Prompt([{"role": "user", "content": line.strip()}], f"{p}:{n}"))
    if not prompts:
        raise DataError(f"--prompts {p}: no prompts (a .jsonl of `prompt`/`messages` rows, or one prompt per "
                        "line of text)", param="prompts")
    return prompts


def _dedupe_key(messages: list[dict], answer: str) -> str:
    text = "\n".join(m["role"] + ": " + m["content"] for m in messages) + "\nassistant: " + answer
    return re.sub(r"\s+", " ", normalize(text).casefold())


def _row_seed(seed: int, prompt: int, sample: int) -> int:
    """A 63-bit seed per (run seed, prompt, sample): distinct rows never share a random stream."""
    digest = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def teacher_hash(folder: Path) -> str:
    """sha256 (16 hex digits) of the teacher's weight files: which weights wrote the data."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def _check(n_per_prompt: int, max_new_tokens: int, temperature: float, top_p: float, min_chars: int,
           max_chars: int | None, max_perplexity: float | None, batch_size: int) -> None:
    for name, value in (("n_per_prompt", n_per_prompt), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be at least 1", param=name)
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be 0 (greedy) or more", param="temperature")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: must be in (0, 1]", param="top_p")
    if min_chars < 0 or (max_chars is not None and max_chars < max(min_chars, 1)):
        raise ConfigError(f"--min-chars {min_chars} / --max-chars {max_chars}: need 0 <= min <= max, max >= 1",
                          param="max_chars")
    if max_perplexity is not None and not max_perplexity > 1:
        raise ConfigError(f"--max-perplexity {max_perplexity}: a perplexity is at least 1; give more than 1",
                          param="max_perplexity")


def _generate(model, tokenizer, samples: list[Sample], params: dict, batch_size: int) -> None:
    """Every sample through one BatchGenerator: rows join as slots free up (continuous batching)."""
    gen = BatchGenerator(model, tokenizer, max_batch_size=batch_size)
    pending, by_seq = list(reversed(samples)), {}
    with progress_bar() as bar:
        task = bar.add_task("synth", total=len(samples), info="")
        events: list = []
        while pending or gen.rows:
            new = []
            while pending and gen.free_slots - len(new) > 0:
                s = pending.pop()
                try:
                    seq = gen.new_sequence(s.prompt_ids, SamplingParams(**params, seed=s.seed))
                except GenforgeError as e:
                    raise DataError(f"{s.prompt.where}: {e.message}", param="prompts") from None
                by_seq[seq] = s
                new.append(seq)
            events = gen.add(new) + gen.step()
            for seq, ev in events:
                s = by_seq[seq]
                if ev.token_id is not None:
                    s.answer_ids.append(ev.token_id)
                s.text += ev.text
                if ev.finish_reason is not None:
                    s.finish_reason = ev.finish_reason
                    bar.update(task, advance=1)


def synthesize(teacher: str | Path, prompts_path: str | Path, out: str | Path, *, n_per_prompt: int = 1,
               max_new_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
               min_chars: int = 1, max_chars: int | None = None, max_perplexity: float | None = None,
               batch_size: int = 16) -> dict:
    """Write SFT rows answered by `teacher` to `out` and the counts to `<out stem>.stats.json`."""
    _check(n_per_prompt, max_new_tokens, temperature, top_p, min_chars, max_chars, max_perplexity, batch_size)
    out = Path(out)
    stats_path = out.with_name(out.stem + ".stats.json")
    if out.exists():
        raise ConfigError(f"--out {out} already exists; choose a new path (synth never overwrites)", param="out")
    prompts = read_prompts(prompts_path)
    folder = model_folder(teacher)
    # full precision, as eval scores: the perplexity filter compares scores across runs and machines
    model, tokenizer = load_lm(teacher)
    template = resolve_chat_template(tokenizer)
    samples = []
    for i, prompt in enumerate(prompts):
        ids = render_messages(tokenizer, template, prompt.messages, add_generation_prompt=True).ids
        samples += [Sample(prompt, k, _row_seed(seed, i, k), ids) for k in range(n_per_prompt)]
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    t0 = time.perf_counter()
    _generate(model, tokenizer, samples, params, batch_size)
    seconds = time.perf_counter() - t0

    counts = {"prompts": len(prompts), "generated": len(samples), "truncated": 0, "duplicates": 0,
              "too_short": 0, "too_long": 0, "high_perplexity": 0}
    kept, dedupe = [], Deduper()
    for s in samples:
        answer = s.text.strip()
        if s.finish_reason != "stop":
            counts["truncated"] += 1
        elif not dedupe.first_time(_dedupe_key(s.prompt.messages, answer)):
            counts["duplicates"] += 1
        elif len(answer) < min_chars:
            counts["too_short"] += 1
        elif max_chars is not None and len(answer) > max_chars:
            counts["too_long"] += 1
        else:
            kept.append(s)
    ppl = continuation_perplexity(model, [(s.prompt_ids, s.answer_ids) for s in kept])
    source = {"teacher": str(folder.resolve()), "teacher_hash": teacher_hash(folder), **params, "seed": seed}
    rows = []
    for s, p in zip(kept, ppl):
        if max_perplexity is not None and p > max_perplexity:
            counts["high_perplexity"] += 1
            continue
        meta = {**source, "row_seed": s.seed, "prompt": s.prompt.where, "sample": s.index,
                "perplexity": round(p, 4), "answer_tokens": len(s.answer_ids)}
        rows.append({"messages": s.prompt.messages + [{"role": "assistant", "content": s.text.strip()}],
                     "meta": meta})
    counts["written"] = len(rows)
    stats = {**counts, "out": str(out), "source": source, "filters": {"min_chars": min_chars, "max_chars": max_chars,
             "max_perplexity": max_perplexity}, "n_per_prompt": n_per_prompt,
             "generated_tokens": sum(len(s.answer_ids) for s in samples), "generate_seconds": round(seconds, 3)}
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(stats_path, json.dumps(stats, indent=2) + "\n")
    return stats
