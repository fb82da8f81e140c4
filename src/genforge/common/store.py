"""The one storage interface for cache entries, document chunks and their vectors, and the model
registry's versions and aliases (common/registry.py owns their meaning; here they are rows).

Two backends: an embedded SQLite file under a state folder (the default, one process or a few on one
machine) and PostgreSQL + pgvector (several replicas sharing one database). `open_store` picks one
from its argument; callers only ever see `Store`. What the two backends share (argument checks,
result rows, the connection pool) is in common/store_backend.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genforge.common.errors import ConfigError, GenforgeError


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
