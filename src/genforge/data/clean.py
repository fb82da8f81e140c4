"""Cleaning: Unicode NFC, trimmed whitespace, exact-duplicate removal and a length filter.

The order is normalise -> length filter -> deduplicate, so an empty or too-short document is
counted once, as `filtered`, however often it occurs.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable
from typing import NamedTuple

from genforge.common.errors import DataError


class Cleaned(NamedTuple):
    docs: list[str]
    duplicates_removed: int
    filtered: int


def normalize(text: str) -> str:
    """NFC form without leading/trailing whitespace, so equal-looking texts compare equal."""
    return unicodedata.normalize("NFC", text).strip()


def length_filter(docs: Iterable[str], min_chars: int = 1, max_chars: int | None = None) -> tuple[list[str], int]:
    """Keep documents with min_chars <= len <= max_chars; also return how many were dropped."""
    kept, dropped = [], 0
    for doc in docs:
        if len(doc) < min_chars or (max_chars is not None and len(doc) > max_chars):
            dropped += 1
        else:
            kept.append(doc)
    return kept, dropped


def dedupe(docs: Iterable[str]) -> tuple[list[str], int]:
    """First occurrence of each exact text, in order; also return how many copies were removed."""
    # A digest, not the text, so memory stays small when the corpus is large.
    seen: set[bytes] = set()
    kept, removed = [], 0
    for doc in docs:
        key = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
        if key in seen:
            removed += 1
        else:
            seen.add(key)
            kept.append(doc)
    return kept, removed


def clean_documents(docs: Iterable[str], min_chars: int = 1, max_chars: int | None = None) -> Cleaned:
    """Normalise, length-filter and deduplicate `docs`."""
    if min_chars < 0:
        raise DataError(f"min_chars must be >= 0, got {min_chars}", param="min_chars")
    if max_chars is not None and max_chars < max(min_chars, 1):
        raise DataError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars}) and >= 1", param="max_chars")
    kept, filtered = length_filter((normalize(d) for d in docs), min_chars, max_chars)
    kept, duplicates = dedupe(kept)
    return Cleaned(kept, duplicates, filtered)
