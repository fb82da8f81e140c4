"""SFT data: conversations from a jsonl file (chat `messages` or alpaca fields) or a built-in set,
tokenized with the model's chat template, with the loss on the assistant's tokens only.

Which tokens are the assistant's is read off the renderer, never found by searching text: for
the i-th message (an assistant turn) the conversation is rendered up to message i with the
generation prompt and up to message i+1 without it, and the tokens the second adds are the turn.
Its content is supervised, and so is the end of the turn: if the text the template writes after
the reply contains a stop token (an EOS id of the model, e.g. Qwen's `<|im_end|>`), the reply's
tokens through that stop token are; otherwise (genforge's ChatML default over a tokenizer without
`<|im_end|>` as a token) the target after the reply's last token is the tokenizer's EOS, in place
of the template's closing text. Either way the model learns to emit the token `genforge serve`
stops on, and the input sequence is exactly the one serve renders (`data.chat_template`).

Batches are a pure function of their index (exact resume). With `packing`, several examples share
a row: position ids restart at each example and a block-diagonal causal mask keeps them from
attending to each other, so an example's logits are the same packed or alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genforge.common.config import Spec, rng
from genforge.common.errors import DataError
from genforge.data.chat_template import render_messages
from genforge.data.instructions import pydoc_instructions
from genforge.data.jsonl import read_records
from genforge.data.tokens import _mix

PYDOC_INSTRUCTIONS = "builtin:pydoc-instructions"
IGNORE = -100  # the label of a position that is not trained on (cross-entropy's ignore_index)


class SFTDataSpec(Spec):
    """The recipe's `data:` section for family sft."""

    val_fraction: float = rng(0.1, min=0, max=0.5, help="share of the conversations held out for eval")
    max_length: int | None = rng(None, min=8, help="tokens per example, longer ones are cut; default: "
                                 "the model's context")
    packing: bool = False


@dataclass
class Conversation:
    messages: list[dict]  # {"role", "content"[, "name"]}
    where: str  # "file:line" (or the built-in set's row), for error messages


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # labels[t]: the token to predict after input_ids[:t+1], or IGNORE


# ----------------------------------------------------------------------------- reading rows

def parse_messages(messages: Any, where: str) -> list[dict]:
    """A `messages` field checked: a non-empty list of {role, content[, name]} with string values."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{k}] must be an object with a string `role` and a string "
                            f"`content`, got {json.dumps(m)[:120]}")
    return [{"role": m["role"], "content": m["content"], **({"name": m["name"]} if m.get("name") else {})}
            for m in messages]


def to_messages(row: dict, where: str) -> list[dict]:
    """A row's conversation: chat `messages` as they are, or alpaca fields (instruction, optional
    input, output; optional system) as a user turn and an assistant turn."""
    if "messages" in row:
        out = parse_messages(row["messages"], where)
    elif "instruction" in row or "output" in row:
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{where}: an alpaca row needs string fields instruction and output; "
                            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing or not a string")
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        out = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    else:
        raise DataError(f"{where}: a row needs `messages` (chat) or `instruction` and `output` (alpaca); "
                        f"it has {sorted(row) or 'no fields'}")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                        "add one or drop the row")
    return out


def read_conversations(source: str) -> list[Conversation]:
    """Every conversation of a .jsonl file or of builtin:pydoc-instructions."""
    if source == PYDOC_INSTRUCTIONS:
        return [Conversation(to_messages(row, f"{source} row {i}"), f"{source} row {i}")
                for i, row in enumerate(pydoc_instructions(seed=0))]
    if source.startswith("builtin:"):
        raise DataError(f"dataset {source}: unknown built-in set; the sft family has {PYDOC_INSTRUCTIONS}")
    rows = read_records(source, "SFT data", param="dataset")
    if not rows:
        raise DataError(f"{source}: no rows; SFT data has one JSON object per line", param="dataset")
    return [Conversation(to_messages(row, f"{source}:{n}"), f"{source}:{n}") for n, row in rows]


def source_identity(source: str) -> dict:
    """Path (or built-in name) and content hash, recorded in the run so a resume sees changed data."""
    if source == PYDOC_INSTRUCTIONS:
        content = json.dumps(pydoc_instructions(seed=0), sort_keys=True).encode()
        return {"path": source, "content_hash": hashlib.sha256(content).hexdigest()[:16]}
    path = Path(source)
    if not path.is_file():
        raise DataError(f"SFT data {source} does not exist (a .jsonl file of conversations, or "
                        f"{PYDOC_INSTRUCTIONS})", param="dataset")
    return {"path": str(path.resolve()), "content_hash": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}


# ----------------------------------------------------------------------------- tokenizing

def encode_conversation(tokenizer: Any, template: str, conv: Conversation, stop_ids: set[int],
                        eos_id: int, last_turn_only: bool = False) -> Example:
    """Token ids of the whole conversation and labels on the assistant turns (see the module doc);
    with `last_turn_only`, on the final message only (a DPO reply after its prompt)."""
    def render(messages: list[dict], prompt: bool):
        try:
            return render_messages(tokenizer, template, messages, add_generation_prompt=prompt)
        except DataError as e:
            raise DataError(f"{conv.where}: the chat template cannot render this conversation: "
                            f"{e.message.split(': ', 1)[-1]}") from None

    def unstable(i: int) -> DataError:
        return DataError(f"{conv.where}: the chat template does not render message {i} as an extension of the "
                         "messages before it (it rewrites earlier turns), so the assistant's tokens cannot be "
                         "told apart; SFT needs a template where each turn appends to the conversation")

    ids = render(conv.messages, False).ids
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant" or (last_turn_only and i != len(conv.messages) - 1):
            continue
        turn = render(conv.messages[:i + 1], False)
        prompt = render(conv.messages[:i], True).ids
        if turn.ids[:len(prompt)] != prompt:  # a generation prompt unlike a past turn's header
            prompt = render(conv.messages[:i], False).ids
        if turn.ids[:len(prompt)] != prompt or ids[:len(turn.ids)] != turn.ids:
            raise unstable(i)
        if i not in turn.content_spans or turn.content_spans[i][0] < len(prompt):
            raise DataError(f"{conv.where}: the chat template does not write message {i}'s content after "
                            "the conversation before it; SFT cannot find the assistant's tokens")
        start, end, content_end = len(prompt), len(turn.ids), turn.content_spans[i][1]
        stop = next((t for t in range(content_end, end) if ids[t] in stop_ids), None)
        last = stop if stop is not None else content_end - 1
        for t in range(max(start, 1), last + 1):
            labels[t - 1] = ids[t]
        if stop is None and content_end >= 1:
            labels[content_end - 1] = eos_id  # the stop token in place of the template's closing text
    return Example(ids, labels)


def encode_conversations(conversations: list[Conversation], tokenizer: Any, template: str, max_length: int,
                         stop_ids: set[int], eos_id: int) -> tuple[list[Example], int]:
    """(examples cut to max_length, how many were dropped because no supervised token was left)."""
    examples, dropped = [], 0
    for conv in conversations:
        ex = encode_conversation(tokenizer, template, conv, stop_ids, eos_id)
        ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        if all(label == IGNORE for label in ex.labels):
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise DataError(f"no example keeps an assistant token within max_length {max_length} (all "
                        f"{len(conversations)} were dropped); raise data.max_length or shorten the prompts",
                        param="data.max_length")
    return examples, dropped


# ----------------------------------------------------------------------------- batches

def pack(examples: list[Example], max_length: int) -> list[list[Example]]:
    """Examples, in order, into rows of at most `max_length` tokens (a new row when one is full)."""
    rows: list[list[Example]] = []
    used = max_length
    for ex in examples:
        if used + len(ex.input_ids) > max_length:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.input_ids)
    return rows


def collate(units: list[list[Example]], pad_id: int, packed_length: int | None) -> dict[str, torch.Tensor]:
    """A batch of rows. Unpacked (one example a row): right padding and a 2D attention mask.
    Packed: rows of `packed_length`, position ids restarting at each example and a (batch, 1, L, L)
    boolean mask, causal within each example and closed between examples (padding is a segment
    of its own, so no row of the mask is empty)."""
    length = packed_length or max(len(u[0].input_ids) for u in units)
    ids = torch.full((len(units), length), pad_id, dtype=torch.long)
    labels = torch.full((len(units), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(units), length), dtype=torch.long)
    segments = torch.full((len(units), length), -1, dtype=torch.long)
    for b, unit in enumerate(units):
        t = 0
        for s, ex in enumerate(unit):
            n = len(ex.input_ids)
            ids[b, t:t + n] = torch.tensor(ex.input_ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            positions[b, t:t + n] = torch.arange(n)
            segments[b, t:t + n] = s
            t += n
    if packed_length is None:
        return {"input_ids": ids, "labels": labels, "attention_mask": (segments >= 0).long()}
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": mask[:, None]}


class ChatBatches:
    """SFT batches: a `train.objective.DataSource`.

    A seeded shuffle holds out `val_fraction` of the examples; the rest are visited in epochs, each
    in its own seeded order, so `train_batch(i)` is a pure function of `i`."""

    def __init__(self, examples: list[Example], batch_size: int, max_length: int, pad_id: int, seed: int,
                 val_fraction: float = 0.1, packing: bool = False):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(_mix(seed, -1))).tolist()
        n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * len(examples)))
        if len(examples) - n_val < 1:
            raise DataError(f"{len(examples)} example(s) leave none to train on after holding out "
                            f"data.val_fraction {val_fraction}; add data or lower it", param="data.val_fraction")
        val = [examples[i] for i in order[:n_val]]
        train = [examples[i] for i in order[n_val:]]
        self.packed_length = max_length if packing else None
        self.train_units = pack(train, max_length) if packing else [[ex] for ex in train]
        self.val_units = pack(val, max_length) if packing else [[ex] for ex in val]
        self.batch_size, self.pad_id, self.seed = batch_size, pad_id, seed
        # a packed row is max_length tokens; unpacked batches vary in length (the loop then skips tokens/s)
        self.tokens_per_batch: int | None = batch_size * max_length if packing else None
        self.n_train, self.n_val = len(train), len(val)
        self._epoch: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._epoch = (epoch, torch.randperm(len(self.train_units), generator=g).tolist())
        return self._epoch[1]

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.train_units)
        units = [self.train_units[self._order(p // n)[p % n]]
                 for p in range(index * self.batch_size, (index + 1) * self.batch_size)]
        return self.collate(units)

    def collate(self, units: list[list[Example]]) -> dict[str, torch.Tensor]:
        return collate(units, self.pad_id, self.packed_length)

    def val_batches(self, n: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The held-out rows in order, at most `n` batches."""
        for b, i in enumerate(range(0, len(self.val_units), self.batch_size)):
            if n is not None and b >= n:
                return
            yield self.collate(self.val_units[i:i + self.batch_size])
