"""Text dataset folders: prepare one from raw text, open it, and cut it into training batches.

    <out>/ tokenizer/   HF format (AutoTokenizer.from_pretrained loads it)
           train.bin    flat token ids, EOS after every document (numpy memmap, dtype in stats)
           val.bin
           stats.json   documents, tokens and UTF-8 bytes per split, vocab, dtype, content_hash, ...

The validation split is the *last* `val_fraction` of the corpus, cut on the text before the
tokenizer is trained, so the tokenizer never sees validation text. With several documents the
cut falls on the document boundary nearest that point; a single document is cut at character
int(n * (1 - val_fraction)), the same split nanoGPT-style baselines use.

Preparation streams, so a corpus larger than memory prepares in bounded memory: documents are
read in chunks, cleaned and deduplicated by digest one at a time and spooled to a scratch file
inside the output's temporary folder; the tokenizer trains from an iterator over that file;
token ids are appended to train.bin / val.bin chunk by chunk. Memory holds one chunk, a digest
and a length per document, and the tokenizer's counts. (A single-document corpus is one string,
and is held whole.)
"""

from __future__ import annotations

import hashlib
import json
import struct
from array import array
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from genforge.common.errors import DataError
from genforge.common.progress import console, progress_bar
from genforge.common.runs import atomic_dir
from genforge.data.clean import CleanCounts, clean_stream
from genforge.data.text import iter_documents
from genforge.data.tokenizer import KINDS, UnknownChars, encode_texts, load_tokenizer, train_tokenizer

SPLITS = ("train", "val")
# Characters per encode_batch call: large enough for Rust to parallelise, small enough that the
# encodings of one chunk (ids, offsets, tokens) stay a few tens of MB.
_ENCODE_CHUNK_CHARS = 1 << 20
_SPOOL = ".documents.spool"
_LEN = struct.Struct("<Q")


def prepare_text_dataset(input: str, out: str | Path, *, tokenizer: str = "byte-bpe", vocab_size: int = 4096,
                         val_fraction: float = 0.1, field: str | None = None, doc_split: str | None = None,
                         min_chars: int = 1, max_chars: int | None = None, seed: int = 0) -> dict:
    """Load, clean, split, train a tokenizer, encode and write a dataset folder; return its stats.

    `seed` is recorded only: every step is deterministic (the split is positional, not random).
    """
    out = Path(out)
    _check_args(input, out, tokenizer, vocab_size, val_fraction)
    docs = iter_documents(input, field=field, doc_split=doc_split)  # checks the input before any writing
    counts = CleanCounts()
    with atomic_dir(out) as tmp:
        spool = tmp / _SPOOL
        with console.status(f"reading and cleaning {input}"):
            lengths = _spool(clean_stream(docs, counts, min_chars, max_chars), spool)
        if not lengths:
            raise DataError(f"no text left after cleaning {input}: {counts.loaded} documents loaded, "
                            f"{counts.filtered} outside the length limits (min_chars={min_chars}, "
                            f"max_chars={max_chars}), {counts.duplicates_removed} duplicates", param="input")
        k, char_cut = _split_point(lengths, val_fraction)

        def split_texts(name: str) -> Iterator[str]:
            if char_cut is not None:  # one document, cut in two
                (text,) = _unspool(spool)
                yield text[:char_cut] if name == "train" else text[char_cut:]
            else:
                yield from _unspool(spool, *((0, k) if name == "train" else (k, len(lengths))))

        with console.status(f"training {tokenizer} tokenizer (vocab {vocab_size})"):
            tok = train_tokenizer(split_texts("train"), tokenizer, vocab_size,
                                  length=k if char_cut is None else 1)
        dtype = np.uint16 if len(tok) < 2**16 else np.uint32
        unknown = UnknownChars()
        n_tokens, n_bytes = {}, {}
        for name in SPLITS:
            total = sum(lengths[:k]) if name == "train" else sum(lengths[k:])
            if char_cut is not None:
                total = char_cut if name == "train" else lengths[0] - char_cut
            # A document cut in two ends only once, in the val split.
            with (tmp / f"{name}.bin").open("wb") as f:
                n_tokens[name], n_bytes[name] = _encode_to(f, tok, split_texts(name), dtype, name, total,
                                                           eos_last=name == "val" or char_cut is None,
                                                           unknown=unknown)
        unknown.warn(tok, stacklevel=2)
        spool.unlink()
        for name in SPLITS:
            if n_tokens[name] < 2:
                raise DataError(f"the {name} split has only {n_tokens[name]} token(s); it needs at least 2 "
                                f"(use more data or a different val_fraction than {val_fraction})",
                                param="val_fraction")
        stats: dict[str, Any] = {
            "kind": "text", "source": input, "documents": len(lengths), "documents_loaded": counts.loaded,
            "duplicates_removed": counts.duplicates_removed, "filtered": counts.filtered,
            "tokens": n_tokens, "bytes": n_bytes,
            "vocab_size": len(tok), "tokenizer": tokenizer, "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction, "doc_split": doc_split or "paragraph", "field": field,
            "min_chars": min_chars, "max_chars": max_chars, "seed": seed,
        }
        tok.save_pretrained(str(tmp / "tokenizer"))
        stats["content_hash"] = content_hash(tmp)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def _spool(docs: Iterable[str], path: Path) -> array:
    """Write `docs` to `path` (length-prefixed UTF-8); return their lengths in characters."""
    lengths = array("q")  # 8 bytes a document: what the split point needs, without the texts
    with path.open("wb") as f:
        for doc in docs:
            data = doc.encode("utf-8")
            f.write(_LEN.pack(len(data)))
            f.write(data)
            lengths.append(len(doc))
    return lengths


def _unspool(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents start..stop-1 of a spool file, read one at a time."""
    with path.open("rb") as f:
        i = 0
        while stop is None or i < stop:
            head = f.read(_LEN.size)
            if not head:
                return
            (n,) = _LEN.unpack(head)
            if i < start:
                f.seek(n, 1)
            else:
                yield f.read(n).decode("utf-8")
            i += 1


def _split_point(lengths: array, val_fraction: float) -> tuple[int, int | None]:
    """(number of train documents, character cut inside the one document or None): val is the last fraction."""
    if len(lengths) == 1:
        return 1, int(lengths[0] * (1 - val_fraction))
    ends = np.cumsum(np.frombuffer(lengths, dtype=np.int64))
    target = ends[-1] * (1 - val_fraction)
    # Boundary k puts docs[:k] in train; both splits keep at least one document.
    return 1 + int(np.argmin(np.abs(ends[:-1] - target))), None


def _chunked(texts: Iterable[str], chars: int) -> Iterator[list[str]]:
    chunk, size = [], 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_to(f: BinaryIO, tok: Any, texts: Iterable[str], dtype: type, name: str, total_chars: int, *,
               eos_last: bool, unknown: UnknownChars) -> tuple[int, int]:
    """Append the ids of `texts` to `f`, EOS after each (but the last unless `eos_last`); (tokens, UTF-8 bytes)."""
    eos = np.asarray([tok.eos_token_id], dtype=dtype)
    n_tokens = n_bytes = 0
    pending_eos = False  # EOS of the previous document, written once the next one shows it was not last
    bar = progress_bar(transient=True)
    # Off a terminal a transient bar would only leave blank lines on stderr.
    bar.disable = not console.is_terminal
    with bar:
        task = bar.add_task(f"encoding {name}", total=total_chars, info="")
        for chunk in _chunked(texts, _ENCODE_CHUNK_CHARS):
            for text, ids in zip(chunk, encode_texts(tok, chunk, unknown)):
                if pending_eos:
                    f.write(eos.tobytes())
                    n_tokens += 1
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += len(arr)
                n_bytes += len(text.encode("utf-8"))
                pending_eos = True
            bar.advance(task, sum(len(t) for t in chunk))
    if pending_eos and eos_last:
        f.write(eos.tobytes())
        n_tokens += 1
    return n_tokens, n_bytes


def _check_args(input: str, out: Path, tokenizer: str, vocab_size: int, val_fraction: float) -> None:
    if tokenizer not in KINDS:
        raise DataError(f"unknown tokenizer {tokenizer!r} (choose one of: {', '.join(KINDS)})", param="tokenizer")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError(f"vocab_size must be a positive integer, got {vocab_size!r}", param="vocab_size")
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}", param="val_fraction")
    if not input.startswith("builtin:"):
        src, dst = Path(input).resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise DataError(f"--out {out} would replace the input {input}; write the dataset elsewhere",
                            param="out")
    if out.exists():
        # atomic_dir replaces `out` wholesale: only ever replace a dataset folder we wrote.
        if not out.is_dir() or (any(out.iterdir()) and not (out / "stats.json").is_file()):
            raise DataError(f"{out} exists and is not a dataset folder; choose a new --out path "
                            "(an existing dataset folder is replaced)", param="out")


def content_hash(folder: str | Path) -> str:
    """sha256 over the token files and tokenizer.json: equal hashes mean equal training data."""
    folder = Path(folder)
    h = hashlib.sha256()
    for rel in ("train.bin", "val.bin", "tokenizer/tokenizer.json"):
        path = folder / rel
        # Name and length in front of each file, so moving bytes between files changes the hash.
        h.update(f"{rel}:{path.stat().st_size}:".encode())
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


class TokenDataset:
    """A dataset folder written by `prepare_text_dataset`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        hint = "create one with `genforge data prepare INPUT --out PATH`"
        if not self.path.is_dir():
            raise DataError(f"dataset folder not found: {self.path} ({hint})", param="dataset")
        stats_path = self.path / "stats.json"
        try:
            self.stats: dict = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise DataError(f"{self.path} is not a text dataset folder (no readable stats.json; {hint})",
                            param="dataset") from None
        missing = [n for n in ("train.bin", "val.bin", "tokenizer/tokenizer.json") if not (self.path / n).is_file()]
        if self.stats.get("kind", "text") != "text" or missing:
            what = f"missing {', '.join(missing)}" if missing else f"it holds a {self.stats.get('kind')} dataset"
            raise DataError(f"{self.path} is not a text dataset folder ({what}; {hint})", param="dataset")

    @property
    def content_hash(self) -> str:
        return str(self.stats["content_hash"])

    @cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.path / "tokenizer")

    def split(self, name: str) -> np.memmap:
        """The token ids of split `name` ("train" or "val"), memory-mapped read-only."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r} (choose one of: {', '.join(SPLITS)})", param="split")
        path = self.path / f"{name}.bin"
        tokens = np.memmap(path, dtype=np.dtype(self.stats["dtype"]), mode="r")
        expected = self.stats.get("tokens", {}).get(name)
        if expected is not None and len(tokens) != expected:
            raise DataError(f"{path} holds {len(tokens)} tokens but stats.json says {expected}; the dataset "
                            "is damaged, prepare it again", param="dataset")
        return tokens

    def batches(self, batch_size: int, context: int, seed: int = 0) -> TokenBatches:
        return TokenBatches(self.split("train"), self.split("val"), batch_size, context, seed)


def _mix(seed: int, index: int) -> int:
    # Hashing (seed, index) gives unrelated generator states for neighbouring indices and seeds.
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _as_tokens(tokens: Any, name: str) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise DataError(f"the {name} tokens must be a flat sequence, got shape {arr.shape}", param="tokens")
    return arr


class TokenBatches:
    """Language-model batches over flat token arrays: a `train.objective.DataSource`.

    `train_batch(i)` draws `batch_size` random windows with a generator seeded by (seed, i), so a
    batch is a pure function of its index and resume is exact. `labels` are the inputs shifted by
    one (already aligned: position t of `labels` is the token after position t of `input_ids`).
    """

    def __init__(self, train_tokens: Any, val_tokens: Any, batch_size: int, context: int, seed: int = 0):
        if batch_size < 1 or context < 1:
            raise DataError(f"batch_size and context must be >= 1, got {batch_size} and {context}")
        self.batch_size, self.context, self.seed = batch_size, context, seed
        self.tokens_per_batch: int | None = batch_size * context
        self._train = _as_tokens(train_tokens, "train")
        self._val = _as_tokens(val_tokens, "val")
        for name, arr in (("train", self._train), ("val", self._val)):
            if len(arr) < context + 1:
                raise DataError(f"context {context} is too long for the data: the {name} split has "
                                f"{len(arr)} tokens and needs at least context + 1 = {context + 1}; "
                                "use a shorter context or more data", param="context")
        self._span = np.arange(context + 1, dtype=np.int64)

    def _windows(self, tokens: np.ndarray, offsets: np.ndarray) -> dict[str, torch.Tensor]:
        # One fancy-index gather from the memmap touches only the pages the windows need.
        w = torch.from_numpy(tokens[offsets[:, None] + self._span].astype(np.int64))
        return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}

    def train_batch(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(_mix(self.seed, index))
        high = len(self._train) - self.context
        offsets = torch.randint(0, high, (self.batch_size,), generator=g).numpy()
        return self._windows(self._train, offsets)

    def num_val_windows(self) -> int:
        return (len(self._val) - 1) // self.context

    def val_batches(self, n: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive non-overlapping windows over the val split, in order; at most `n` batches."""
        starts = np.arange(self.num_val_windows(), dtype=np.int64) * self.context
        for b, i in enumerate(range(0, len(starts), self.batch_size)):
            if n is not None and b >= n:
                return
            yield self._windows(self._val, starts[i:i + self.batch_size])
