"""Tokenizers trained with the `tokenizers` library and saved in Hugging Face format.

* byte-bpe: byte-level BPE over all 256 byte values, so any UTF-8 text encodes and decodes back
  exactly (no unknown token is ever needed).
* char: one token per character seen in training (most frequent first when `vocab_size` is
  smaller than the character set); anything else becomes `<|unk|>`, and `encode_texts` warns.

Both carry `<|bos|>`, `<|eos|>`, `<|pad|>` (ids 0, 1, 2). Encoding never adds them: whether a
sequence starts with BOS is the model family's decision, not the tokenizer's.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from genforge.common.errors import DataError

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
KINDS = ("byte-bpe", "char")


def train_tokenizer(docs: Iterable[str], kind: str = "byte-bpe", vocab_size: int = 4096,
                    length: int | None = None) -> PreTrainedTokenizerFast:
    """A tokenizer of `kind` trained on `docs` with at most `vocab_size` tokens (specials included).

    `docs` may be any iterable (a stream read from disk): both kinds keep counts, not texts.
    `length` (the number of documents, when known) only feeds the trainer's progress estimate.
    """
    if kind == "byte-bpe":
        return _wrap(_train_byte_bpe(docs, vocab_size, length), unk=False)
    if kind == "char":
        return _wrap(_train_char(docs, vocab_size), unk=True)
    raise DataError(f"unknown tokenizer kind {kind!r} (choose one of: {', '.join(KINDS)})", param="tokenizer")


def _train_byte_bpe(docs: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    specials = [BOS, EOS, PAD]
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise DataError(f"vocab_size {vocab_size} is too small for byte-bpe: it needs at least {minimum} "
                        "(256 bytes + 3 special tokens)", param="vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if length is None and isinstance(docs, Sequence):
        length = len(docs)
    tok.train_from_iterator(docs, trainer, length=length)
    # BPE stops early once every word is a single token; a smaller vocabulary than asked would
    # silently change the model's embedding size, so say so instead.
    if tok.get_vocab_size() < vocab_size:
        raise DataError(f"vocab_size {vocab_size} is more than this data supports: byte-bpe can learn at "
                        f"most {tok.get_vocab_size()} tokens from it; use --vocab-size {tok.get_vocab_size()} "
                        "or less, or more data", param="vocab_size")
    return tok


def _train_char(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    specials = [BOS, EOS, PAD, UNK]
    if vocab_size < len(specials) + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for char: it needs at least {len(specials) + 1} "
                        "(4 special tokens + 1 character)", param="vocab_size")
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update(doc)
    counts.pop("", None)
    # Most frequent first, ties by code point, so the vocabulary is deterministic.
    ranked = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(specials)]
    vocab = {t: i for i, t in enumerate(specials + sorted(ranked))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins tokens without the spaces a word-level decoder would put between them.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def _wrap(tok: Tokenizer, unk: bool) -> PreTrainedTokenizerFast:
    extra = {"unk_token": UNK} if unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False, **extra)


class UnknownChars:
    """Characters encoded as the unknown token, collected over many `encode_texts` calls so a
    streamed corpus gets one warning, not one per chunk."""

    def __init__(self) -> None:
        self.count = 0
        self.chars: set[str] = set()

    def warn(self, tokenizer: PreTrainedTokenizerFast, stacklevel: int = 2) -> None:
        if self.count:
            unseen = sorted(self.chars)
            shown = ", ".join(repr(c) for c in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
            warnings.warn(f"{self.count} character(s) are not in the tokenizer's vocabulary and were encoded as "
                          f"{tokenizer.unk_token} ({shown})", UserWarning, stacklevel=stacklevel + 1)


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str],
                 unknown: UnknownChars | None = None) -> list[list[int]]:
    """Token ids of each text (no special tokens added), batched in Rust; warns on unknown characters
    (or, given `unknown`, adds them to it and leaves the warning to the caller)."""
    backend = tokenizer.backend_tokenizer
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    if isinstance(backend.model, models.WordLevel):
        # Char tokens never span a newline, so long texts can be cut there and encoded in parallel.
        pieces = [_cut_at_newlines(t) for t in texts]
        flat = iter(encode([p for ps in pieces for p in ps], add_special_tokens=False))
        ids = [[i for _ in ps for i in next(flat).ids] for ps in pieces]
    else:
        ids = [e.ids for e in encode(list(texts), add_special_tokens=False)]
    unk_id = tokenizer.unk_token_id
    if unk_id is not None:
        n_unk = sum(seq.count(unk_id) for seq in ids)
        if n_unk:
            vocab = tokenizer.get_vocab()
            found = UnknownChars() if unknown is None else unknown
            found.count += n_unk
            found.chars.update(c for t in texts for c in set(t) if c not in vocab)
            if unknown is None:
                found.warn(tokenizer)
    return ids


def _cut_at_newlines(text: str, size: int = 1 << 15) -> list[str]:
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        if cut < 0:
            break
        pieces.append(text[start:cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved with `save_pretrained` (ours or any HF fast tokenizer folder)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer at {path} (tokenizer.json missing)", param="tokenizer")
    return AutoTokenizer.from_pretrained(str(path))
