"""What the two store backends (store_sqlite.py, store_pg.py) share: argument checks and the errors
they raise, the rows they return, and the pool of open connections each keeps.

Only the backends import this module; everyone else sees `Store` (common/store.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

import numpy as np

from genforge.common.errors import ConfigError, DataError, NotFoundError
from genforge.common.store import CacheEntry, Chunk

_INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_IDLE_CONNECTIONS = 8


# --- document indexes ---

def check_new_index(index: str, dim: int) -> None:
    """The arguments of `Store.create_index`: a valid name and a positive dimension."""
    if not isinstance(index, str) or not _INDEX_NAME.match(index):
        raise ConfigError(f"index name {index!r} is not valid: use 1-64 letters, digits, '_', '-' or '.', "
                          "starting with a letter or digit", param="index")
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"index {index!r}: dim must be a positive integer, got {dim!r}", param="dim")


def index_mismatch(index: str, held: tuple[int, str], dim: int, embedder: str) -> ConfigError:
    """`create_index` of an existing index with another dimension or embedder than it `held`."""
    return ConfigError(f"index {index!r} holds {held[0]}-dim vectors of {held[1]!r}, not {dim}-dim of "
                       f"{embedder!r}; use that embedder, another index name, or drop the index", param="index")


def index_info_row(index: str, dim: int, embedder: str, version: str, meta: dict, chunks: int,
                   sources: int) -> dict:
    return {"name": index, "dim": dim, "embedder": embedder, "chunks": chunks, "sources": sources,
            "version": version, "meta": meta}


def unknown_index(index: str, known: list[str]) -> NotFoundError:
    listed = ", ".join(sorted(known)) if known else "none yet"
    return NotFoundError(f"unknown index {index!r} (known: {listed}); create it with "
                         "`genforge rag ingest PATHS --index NAME`", param="index")


def chunk_id(index: str, source: str, position: int) -> str:
    return f"{index}:{hashlib.sha1(source.encode('utf-8')).hexdigest()[:10]}:{position}"


def check_source(index: str, dim: int, source: str, chunks: list[Chunk], vectors: np.ndarray) -> np.ndarray:
    """The arguments of `IndexWriter.replace_source`; returns the vectors as a float32 matrix."""
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
    m = as_matrix(vectors, len(chunks), dim, f"index {index!r}, source {source!r}")
    for c in chunks:
        to_json(c.metadata, f"metadata of {source!r} chunk {c.position}")
    return m


# --- vectors, JSON and search ---

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


def to_json(value: dict, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} is not JSON-serialisable: {e}") from e


def check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}", param="k")


def top_k(scores: np.ndarray, k: int) -> Iterator[int]:
    """Row numbers of the k best scores, best first (argpartition: O(n), not a full sort)."""
    if k < len(scores):
        idx = np.argpartition(-scores, k - 1)[:k]
    else:
        idx = np.arange(len(scores))
    return iter(idx[np.argsort(-scores[idx], kind="stable")].tolist())


# --- semantic cache ---

def new_cache_row(entry: CacheEntry) -> tuple[np.ndarray, str, float, float]:
    """What `cache_put` stores of `entry`: (vector, response as JSON, created, last used); both times
    default to now."""
    v = as_vector(entry.vector, None, f"cache entry for key {entry.key[:16]!r}")
    created = entry.created or time.time()
    return v, to_json(entry.response, "cache response"), created, entry.last_used or created


def check_prune(max_entries: int | None) -> None:
    if max_entries is not None and max_entries < 0:
        raise ConfigError(f"max_entries must be >= 0, got {max_entries}", param="max_entries")


# --- model registry ---

def version_row(name: str, version: int, record: dict, created: float) -> dict:
    """One `Store.registry_versions` item: the record pushed, plus its name, number and time."""
    return {**record, "name": name, "version": version, "created": created}


def alias_move(current: int | None, version: int, expect: int | None) -> bool | None:
    """What `registry_move_alias` does to an alias that points at `current`: False (refused: it no
    longer points at `expect`), None (nothing: it already points at `version`) or True (move it)."""
    if expect is not None and current != expect:
        return False
    return True if current != version else None


# --- connections ---

class Connection(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Connection)


class ConnectionPool(Generic[C]):
    """A few open connections shared by threads: one is taken per operation, then given back.

    psycopg_pool is not a dependency, and sqlite3 has no pool; this is the part of one both backends
    need. `reusable(conn)` says whether a connection given back may be kept (not broken, no
    transaction left open); anything else is closed. At most `max_idle` are kept.
    """

    def __init__(self, connect: Callable[[], C], reusable: Callable[[C], bool], *,
                 ping: Callable[[C], object] | None = None, max_idle: int = MAX_IDLE_CONNECTIONS):
        self._connect, self._reusable, self._ping, self._max_idle = connect, reusable, ping, max_idle
        self._idle: list[C] = []
        self._lock = threading.Lock()
        self.closed = False

    @contextmanager
    def connection(self, *, check: bool = False) -> Iterator[tuple[C, bool]]:
        """(connection, whether it was reused from the pool rather than opened just now).

        check: `ping` a reused connection first, for work that cannot simply be retried if it has gone
        stale; one that fails is replaced by a new one.
        """
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and check and self._ping is not None:
            try:
                self._ping(conn)
            except Exception:  # whatever the driver raises for a dead connection: open a new one
                conn.close()
                conn = None
        reused = conn is not None
        if conn is None:
            conn = self._connect()
        try:
            yield conn, reused
        finally:
            self.give_back(conn)

    def give_back(self, conn: C) -> None:
        """Keeps a healthy idle connection for reuse, closes anything else."""
        if self._reusable(conn):
            with self._lock:
                if not self.closed and len(self._idle) < self._max_idle:
                    self._idle.append(conn)
                    return
        conn.close()

    def close_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self.close_idle()
