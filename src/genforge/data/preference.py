"""DPO data: preference pairs (a prompt, a chosen and a rejected reply) from a jsonl file or the
built-in pydoc set, rendered with the chat template SFT and serve use (data/chat_template.py).

A row is either plain text, `{"prompt": str, "chosen": str, "rejected": str}` (the prompt becomes
one user turn), or chat form: the conversation so far as `messages` (or `prompt`) and each reply a
string, an assistant message, or a list holding one (trl's conversational format). Each side is
the prompt's conversation plus its reply, encoded as an SFT example with labels on that reply only
(through its end-of-turn token, as SFT learns it). A batch is the chosen rows, then the rejected
rows in the same order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genforge.common.config import Spec, rng
from genforge.common.errors import DataError
from genforge.data.chat import (
    IGNORE,
    ChatBatches,
    Conversation,
    Example,
    collate,
    encode_conversation,
    to_messages,
)
from genforge.data.instructions import pydoc_preferences
from genforge.data.jsonl import read_records

PYDOC_PREFERENCES = "builtin:pydoc-preferences"


class PreferenceDataSpec(Spec):
    """The recipe's `data:` section for family dpo."""

    val_fraction: float = rng(0.1, min=0, max=0.5, help="share of the pairs held out for eval")
    max_length: int | None = rng(None, min=8, help="tokens per side (prompt + reply), longer ones are cut; "
                                 "default: the model's context")


@dataclass
class PreferencePair:
    prompt: list[dict]  # the conversation before the reply
    chosen: str
    rejected: str
    where: str  # "file:line" (or the built-in set's row), for error messages


@dataclass
class EncodedPair:
    chosen: Example
    rejected: Example


def _reply(row: dict, key: str, where: str) -> str:
    """A reply as text: a string, {"role": "assistant", "content": ...}, or a list of one such message."""
    value = row.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        value = value["content"]
    if not isinstance(value, str):
        got = "missing" if key not in row else f"got {json.dumps(value)[:80]}"
        raise DataError(f"{where}: `{key}` must be the reply: a string or one assistant message ({got})")
    return value


def to_pair(row: dict, where: str) -> PreferencePair:
    """A row as a preference pair; a missing or malformed field is a DataError naming `where`."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if "prompt" not in row and "messages" not in row:
        missing.insert(0, "prompt (or messages)")
    if missing:
        raise DataError(f"{where}: a preference row needs prompt (or chat messages), chosen and rejected; "
                        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    prompt = row["messages"] if "messages" in row else row["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: the prompt must be a string or a non-empty list of {{role, content}} messages")
    else:
        # to_messages checks each message; a prompt is followed by a reply, so it must not end with one
        messages = to_messages({"messages": prompt + [{"role": "assistant", "content": ""}]}, where)[:-1]
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt's conversation ends with an assistant turn; it should end "
                            "where the chosen and rejected replies begin (usually a user turn)")
    return PreferencePair(messages, _reply(row, "chosen", where), _reply(row, "rejected", where), where)


def _check_builtin(source: str) -> None:
    if source.startswith("builtin:") and source != PYDOC_PREFERENCES:
        raise DataError(f"dataset {source}: unknown built-in set; the dpo family has {PYDOC_PREFERENCES}",
                        param="dataset")


def read_preferences(source: str) -> list[PreferencePair]:
    """Every pair of a .jsonl file or of builtin:pydoc-preferences."""
    if source == PYDOC_PREFERENCES:
        return [to_pair(row, f"{source} row {i}") for i, row in enumerate(pydoc_preferences(seed=0))]
    _check_builtin(source)
    rows = read_records(source, "preference data", param="dataset")
    if not rows:
        raise DataError(f"{source}: no rows; preference data has one JSON object per line (prompt, chosen, "
                        "rejected)", param="dataset")
    return [to_pair(row, f"{source}:{n}") for n, row in rows]


def source_identity(source: str) -> dict:
    """Path (or built-in name) and content hash, recorded in the run so a resume sees changed data."""
    if source == PYDOC_PREFERENCES:
        content = json.dumps(pydoc_preferences(seed=0), sort_keys=True).encode()
        return {"path": source, "content_hash": hashlib.sha256(content).hexdigest()[:16]}
    _check_builtin(source)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"preference data {source} does not exist (a .jsonl file of prompt/chosen/rejected "
                        f"rows, or {PYDOC_PREFERENCES})", param="dataset")
    return {"path": str(path.resolve()), "content_hash": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


def encode_pairs(pairs: list[PreferencePair], tokenizer: Any, template: str, max_length: int,
                 stop_ids: set[int], eos_id: int) -> tuple[list[EncodedPair], int]:
    """(pairs cut to max_length, how many were dropped because a side kept no reply token)."""
    out, dropped = [], 0
    for pair in pairs:
        sides = []
        for reply in (pair.chosen, pair.rejected):
            conv = Conversation(pair.prompt + [{"role": "assistant", "content": reply}], pair.where)
            ex = encode_conversation(tokenizer, template, conv, stop_ids, eos_id, last_turn_only=True)
            sides.append(Example(ex.input_ids[:max_length], ex.labels[:max_length]))
        if any(all(label == IGNORE for label in ex.labels) for ex in sides):
            dropped += 1
        else:
            out.append(EncodedPair(*sides))
    if not out:
        raise DataError(f"no pair keeps a reply token on both sides within max_length {max_length} (all "
                        f"{len(pairs)} were dropped); raise data.max_length or shorten the prompts",
                        param="data.max_length")
    return out, dropped


class PreferenceBatches(ChatBatches):
    """DPO batches: ChatBatches' held-out split and seeded epochs over pairs; a batch of B pairs is
    2B rows, `batch_size` chosen then their rejected, right-padded."""

    def __init__(self, pairs: list[EncodedPair], batch_size: int, max_length: int, pad_id: int, seed: int,
                 val_fraction: float = 0.1):
        super().__init__(pairs, batch_size, max_length, pad_id, seed, val_fraction, packing=False)

    def shard(self, batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
        """Process `rank` of `world`'s pairs of a batch (several processes train, train/distributed.py):
        its share of the chosen rows and the same pairs' rejected rows, still chosen first."""
        n = len(batch["input_ids"]) // 2
        mine = torch.arange(rank * n // world, (rank + 1) * n // world)
        return {k: v[torch.cat([mine, mine + n])] for k, v in batch.items()}

    def collate(self, units: list[list[EncodedPair]]) -> dict[str, torch.Tensor]:
        pairs = [unit[0] for unit in units]
        return collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], self.pad_id, None)
