"""The one storage interface for cache entries, document chunks and their vectors, and the model
registry's versions and aliases (common/registry.py owns their meaning; here they are rows).

Two backends: an embedded SQLite file under a state folder (the default, one process or a few on one
machine) and PostgreSQL + pgvector (several replicas sharing one database). `open_store` picks one
from its argument; callers only ever see `Store`.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genforge.common.errors import ConfigError, DataError, GenforgeError, NotFoundError

_INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class StoreUnavailable(GenforgeError):
    """The database is down or unreachable; the message names it (never its password)."""

    status = 503
    type = "store_unavailable"


@dataclass(frozen=True)
class Chunk:
    source: str
    position: int
    text: str
    metadata: dict = field(default_factory=dict)
    id: str = ""


@dataclass
class CacheEntry:
    key: str
    prompt: str
    vector: np.ndarray
    response: dict
    created: float = 0.0
    last_used: float = 0.0
    id: int | None = None


class IndexWriter(ABC):
    """What a `Store.write(index)` block may do; nothing is visible to anyone until the block exits."""

    @abstractmethod
    def replace_source(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...

    @abstractmethod
    def remove_source(self, source: str) -> None: ...


class Store(ABC):
    """Document indexes (RAG) and the semantic cache; implementations are thread-safe."""

    url: str

    # --- document indexes ---
    @abstractmethod
    def create_index(self, index: str, *, dim: int, embedder: str) -> None: ...

    @abstractmethod
    def index_info(self, index: str) -> dict | None: ...

    @abstractmethod
    def indexes(self) -> list[str]: ...

    @abstractmethod
    def set_index_meta(self, index: str, meta: dict) -> None: ...

    @abstractmethod
    def write(self, index: str) -> AbstractContextManager[IndexWriter]: ...

    @abstractmethod
    def source_digests(self, index: str) -> dict[str, str]: ...

    @abstractmethod
    def chunks(self, index: str) -> list[Chunk]: ...

    @abstractmethod
    def nearest(self, index: str, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]: ...

    @abstractmethod
    def index_version(self, index: str) -> str: ...

    @abstractmethod
    def drop_index(self, index: str) -> None: ...

    # --- semantic cache ---
    @abstractmethod
    def cache_put(self, entry: CacheEntry) -> int: ...

    @abstractmethod
    def cache_exact(self, key: str, prompt: str) -> CacheEntry | None: ...

    @abstractmethod
    def cache_nearest(self, key: str, vector: np.ndarray, k: int) -> list[tuple[CacheEntry, float]]: ...

    @abstractmethod
    def cache_touch(self, entry_id: int) -> None: ...

    @abstractmethod
    def cache_delete(self, key: str | None = None) -> int: ...

    @abstractmethod
    def cache_prune(self, *, max_entries: int | None, ttl_s: float | None) -> int: ...

    @abstractmethod
    def cache_count(self) -> int: ...

    # --- model registry (common/registry.py): versions are immutable rows, aliases point at one ---
    @abstractmethod
    def registry_add(self, name: str, record: dict) -> int:
        """Records the next version of `name` (1 for the first) in one transaction; returns its number."""

    @abstractmethod
    def registry_versions(self, name: str) -> list[dict]:
        """Every version of `name`, oldest first: its record plus `name`, `version` and `created`."""

    @abstractmethod
    def registry_names(self) -> list[str]: ...

    @abstractmethod
    def registry_aliases(self, name: str) -> dict[str, tuple[int, int | None]]:
        """alias -> (version, the version it pointed at before its last move, or None)."""

    @abstractmethod
    def registry_move_alias(self, name: str, alias: str, version: int, *, expect: int | None = None) -> bool:
        """Points `alias` at `version` (remembering where it pointed before); with `expect`, only if it
        still points at `expect` (False otherwise: another replica moved it meanwhile)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def open_store(target: str | Path) -> Store:
    """A PostgreSQL URL (postgresql://...) opens the shared store; anything else is a state folder."""
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        from genforge.common.store_pg import PgStore

        return PgStore(text)
    if "://" in text:
        raise ConfigError(f"store {text!r}: unknown scheme; give a folder for the embedded store or a "
                          "postgresql://user@host:port/db URL", param="store")
    from genforge.common.store_sqlite import SqliteStore

    return SqliteStore(Path(text).expanduser())  # "~/..." from a config file, where no shell expands it


# --- helpers shared by the backends ---

def check_index_name(index: str) -> None:
    if not isinstance(index, str) or not _INDEX_NAME.match(index):
        raise ConfigError(f"index name {index!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', "
                          "starting with a letter or digit", param="index")


def chunk_id(index: str, source: str, position: int) -> str:
    return f"{index}:{hashlib.sha1(source.encode('utf-8')).hexdigest()[:10]}:{position}"


def as_vector(vector: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """A 1-D float32 copy of `vector`; ConfigError when it has the wrong dimension."""
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1 or (dim is not None and v.shape[0] != dim) or v.shape[0] == 0:
        want = f"({dim},)" if dim is not None else "a 1-D vector"
        raise ConfigError(f"{what}: vector of shape {tuple(np.shape(vector))}, expected {want}; embed with "
                          "the same model the index or cache was built with", param="vector")
    if not np.all(np.isfinite(v)):
        raise DataError(f"{what}: the vector holds NaN or infinite values", param="vector")
    return v


def as_matrix(vectors: np.ndarray, rows: int, dim: int, what: str) -> np.ndarray:
    m = np.asarray(vectors, dtype=np.float32)
    if rows == 0 and m.size == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if m.ndim != 2 or m.shape[1] != dim:
        raise ConfigError(f"{what}: vectors of shape {tuple(np.shape(vectors))}, expected ({rows}, {dim}); "
                          "embed with the model the index was created for", param="vectors")
    if m.shape[0] != rows:
        raise DataError(f"{what}: {m.shape[0]} vectors for {rows} chunks; give one vector per chunk")
    if not np.all(np.isfinite(m)):
        raise DataError(f"{what}: the vectors hold NaN or infinite values")
    return m


def check_chunks(source: str, chunks: list[Chunk]) -> None:
    positions = [c.position for c in chunks]
    if len(set(positions)) != len(positions):
        raise DataError(f"source {source!r}: chunk positions repeat; each chunk needs its own position")
    for c in chunks:
        if "\x00" in c.text:
            raise DataError(f"source {source!r} chunk {c.position}: the text holds NUL characters; "
                            "remove them when reading the document")
        if c.source != source:
            raise DataError(f"replace_source({source!r}) got a chunk of source {c.source!r}; "
                            "pass the chunks of one source at a time")


def to_json(value: dict, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} is not JSON-serialisable: {e}") from e


def check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}", param="k")


def unknown_index(index: str, known: list[str]) -> NotFoundError:
    listed = ", ".join(sorted(known)) if known else "none yet"
    return NotFoundError(f"unknown index {index!r} (known: {listed}); create it with "
                         "`genforge rag ingest PATHS --index NAME`", param="index")


def top_k(scores: np.ndarray, k: int) -> Iterator[int]:
    """Row numbers of the k best scores, best first (argpartition: O(n), not a full sort)."""
    if k < len(scores):
        idx = np.argpartition(-scores, k - 1)[:k]
    else:
        idx = np.arange(len(scores))
    return iter(idx[np.argsort(-scores[idx], kind="stable")].tolist())
