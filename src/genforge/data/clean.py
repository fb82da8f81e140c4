"""Cleaning: Unicode NFC, trimmed whitespace, exact-duplicate removal and a length filter.

The order is normalise -> length filter -> deduplicate, so an empty or too-short document is
counted once, as `filtered`, however often it occurs.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from genforge.common.errors import DataError


class Cleaned(NamedTuple):
    docs: list[str]
    duplicates_removed: int
    filtered: int


def normalize(text: str) -> str:
    """NFC form without leading/trailing whitespace, so equal-looking texts compare equal."""
    return unicodedata.normalize("NFC", text).strip()


class Deduper:
    """Remembers a 16-byte digest of every text it has seen, never the text, so memory stays small
    (tens of bytes per document) however large the corpus is."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def first_time(self, doc: str) -> bool:
        key = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


@dataclass
class CleanCounts:
    loaded: int = 0
    duplicates_removed: int = 0
    filtered: int = 0


def _check_limits(min_chars: int, max_chars: int | None) -> None:
    if min_chars < 0:
        raise DataError(f"min_chars must be >= 0, got {min_chars}", param="min_chars")
    if max_chars is not None and max_chars < max(min_chars, 1):
        raise DataError(f"max_chars ({max_chars}) must be >= min_chars ({min_chars}) and >= 1", param="max_chars")


def clean_stream(docs: Iterable[str], counts: CleanCounts, min_chars: int = 1,
                 max_chars: int | None = None) -> Iterator[str]:
    """Normalise, length-filter and deduplicate `docs` one at a time, counting into `counts`."""
    _check_limits(min_chars, max_chars)
    seen = Deduper()
    for doc in docs:
        counts.loaded += 1
        doc = normalize(doc)
        if len(doc) < min_chars or (max_chars is not None and len(doc) > max_chars):
            counts.filtered += 1
        elif not seen.first_time(doc):
            counts.duplicates_removed += 1
        else:
            yield doc


def clean_documents(docs: Iterable[str], min_chars: int = 1, max_chars: int | None = None) -> Cleaned:
    """Normalise, length-filter and deduplicate `docs`."""
    counts = CleanCounts()
    kept = list(clean_stream(docs, counts, min_chars, max_chars))
    return Cleaned(kept, counts.duplicates_removed, counts.filtered)
