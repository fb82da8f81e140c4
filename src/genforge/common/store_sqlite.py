"""The embedded store: one SQLite file `<state_dir>/store.sqlite3`, shared by threads and processes.

WAL mode lets readers run while one process writes; the busy timeout makes a second writer wait
instead of failing. Vectors are float32 BLOBs and search is numpy brute force over a matrix kept in
memory until the index's version changes (20k x 384 is a few ms, so no ANN index is needed here).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np

from genforge.common.errors import ConfigError
from genforge.common.store import (
    CacheEntry,
    Chunk,
    IndexWriter,
    Store,
    StoreUnavailable,
    as_matrix,
    as_vector,
    check_chunks,
    check_index_name,
    check_k,
    chunk_id,
    to_json,
    top_k,
    unknown_index,
)

T = TypeVar("T")
BUSY_TIMEOUT_S = 30.0
MAX_IDLE = 8

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS indexes (name TEXT PRIMARY KEY, dim INTEGER NOT NULL, embedder TEXT NOT NULL,
    version TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS sources (idx TEXT NOT NULL REFERENCES indexes(name) ON DELETE CASCADE,
    source TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (idx, source));
CREATE TABLE IF NOT EXISTS chunks (idx TEXT NOT NULL, source TEXT NOT NULL, position INTEGER NOT NULL,
    text TEXT NOT NULL, metadata TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (idx, source, position),
    FOREIGN KEY (idx, source) REFERENCES sources(idx, source) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS cache (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL,
    prompt TEXT NOT NULL, vector BLOB NOT NULL, response TEXT NOT NULL, created REAL NOT NULL,
    last_used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS cache_key ON cache(key);
CREATE INDEX IF NOT EXISTS cache_last_used ON cache(last_used);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('cache_version', 0);
CREATE TABLE IF NOT EXISTS models (name TEXT NOT NULL, version INTEGER NOT NULL, record TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS model_aliases (name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL,
    previous INTEGER, updated REAL NOT NULL, PRIMARY KEY (name, alias));
COMMIT;
"""


def _blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def _unit(m: np.ndarray) -> np.ndarray:
    # Stored vectors should already be unit length; normalising here keeps scores cosine either way.
    norms = np.linalg.norm(m, axis=-1, keepdims=True)
    return m / np.where(norms == 0, 1, norms)


class _BufferedWriter(IndexWriter):
    """Records the block's operations; they are applied in one short transaction when the block exits.

    SQLite has one writer at a time: holding the write lock while an ingest embeds its documents
    would stall every cache put of a server sharing the file past its busy timeout.
    """

    def __init__(self, index: str, dim: int):
        self.index, self.dim = index, dim
        self.ops: list[tuple[str, str, str, list[Chunk], np.ndarray | None]] = []

    def replace_source(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        check_chunks(source, chunks)
        m = as_matrix(vectors, len(chunks), self.dim, f"index {self.index!r}, source {source!r}")
        for c in chunks:
            to_json(c.metadata, f"metadata of {source!r} chunk {c.position}")
        self.ops.append(("replace", source, str(digest), list(chunks), m.copy()))

    def remove_source(self, source: str) -> None:
        self.ops.append(("remove", source, "", [], None))


class SqliteStore(Store):
    def __init__(self, state_dir: str | Path):
        root = Path(state_dir).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"state folder {str(root)!r} cannot be created ({e.strerror}); pass a writable "
                              "folder with --state-dir", param="state_dir") from e
        self.path = root / "store.sqlite3"
        self.url = str(self.path)
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # index -> (version, chunks, unit matrix); key -> (ids, unit matrix) valid at _cache_seen
        self._matrices: dict[str, tuple[str, list[Chunk], np.ndarray]] = {}
        self._cache_mats: dict[str, tuple[list[int], np.ndarray]] = {}
        self._cache_seen = -1
        self._closed = False
        try:
            with self._connection() as conn:
                conn.executescript(_SCHEMA)
        except sqlite3.Error as e:
            self.close()
            raise ConfigError(f"store {self.url} cannot be opened ({e}); pass a writable folder with "
                              "--state-dir, or move a damaged store.sqlite3 away", param="state_dir") from e

    # --- connections and error mapping ---
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a transaction spans what we say.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """One connection per running operation, kept for reuse afterwards (at most MAX_IDLE stay open)."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"store {self.url} is closed")
            conn = self._idle.pop() if self._idle else None
        conn = conn or self._connect()
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < MAX_IDLE and not conn.in_transaction
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"store {self.url} cannot be used: {e}; check that the file is on a "
                                   "writable local disk and not locked by another program") from e
        except sqlite3.DatabaseError as e:
            raise StoreUnavailable(f"store {self.url} is not a usable SQLite database ({e}); move it "
                                   "away and start again with an empty state folder") from e

    def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
        """fn in one transaction (BEGIN IMMEDIATE for writes so the lock is taken up front)."""
        with self._errors(), self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    conn.execute("ROLLBACK")
                raise
            return out

    def _index_row(self, conn: sqlite3.Connection, index: str) -> tuple[int, str, str, str]:
        row = conn.execute("SELECT dim, embedder, version, meta FROM indexes WHERE name=?", (index,)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT name FROM indexes")]
            raise unknown_index(index, known)
        return row

    # --- document indexes ---
    def create_index(self, index: str, *, dim: int, embedder: str) -> None:
        check_index_name(index)
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"index {index!r}: dim must be a positive integer, got {dim!r}", param="dim")

        def fn(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT dim, embedder FROM indexes WHERE name=?", (index,)).fetchone()
            if row is None:
                c.execute("INSERT INTO indexes (name, dim, embedder, version) VALUES (?, ?, ?, ?)",
                          (index, dim, embedder, uuid.uuid4().hex))
            elif tuple(row) != (dim, embedder):
                raise ConfigError(f"index {index!r} holds {row[0]}-dim vectors of {row[1]!r}, not {dim}-dim of "
                                  f"{embedder!r}; use that embedder, another index name, or drop the index",
                                  param="index")
        self._run(fn, write=True)

    def index_info(self, index: str) -> dict | None:
        def fn(c: sqlite3.Connection) -> dict | None:
            row = c.execute("SELECT dim, embedder, version, meta FROM indexes WHERE name=?", (index,)).fetchone()
            if row is None:
                return None
            n_chunks = c.execute("SELECT count(*) FROM chunks WHERE idx=?", (index,)).fetchone()[0]
            n_sources = c.execute("SELECT count(*) FROM sources WHERE idx=?", (index,)).fetchone()[0]
            return {"name": index, "dim": row[0], "embedder": row[1], "chunks": n_chunks, "sources": n_sources,
                    "version": row[2], "meta": json.loads(row[3])}
        return self._run(fn)

    def indexes(self) -> list[str]:
        return self._run(lambda c: [r[0] for r in c.execute("SELECT name FROM indexes ORDER BY name")])

    def set_index_meta(self, index: str, meta: dict) -> None:
        text = to_json(meta, f"meta of index {index!r}")

        def fn(c: sqlite3.Connection) -> None:
            merged = {**json.loads(self._index_row(c, index)[3]), **json.loads(text)}
            c.execute("UPDATE indexes SET meta=? WHERE name=?", (to_json(merged, "meta"), index))
        self._run(fn, write=True)

    @contextmanager
    def write(self, index: str) -> Iterator[IndexWriter]:
        dim = self._run(lambda c: self._index_row(c, index))[0]
        writer = _BufferedWriter(index, dim)
        yield writer
        if writer.ops:
            self._run(lambda c: self._apply(c, writer), write=True)

    def _apply(self, c: sqlite3.Connection, w: _BufferedWriter) -> None:
        if self._index_row(c, w.index)[0] != w.dim:  # dropped (NotFoundError) or recreated while the block ran
            raise ConfigError(f"index {w.index!r} was recreated with another dim while being written; "
                              "nothing was written, run the ingest again", param="index")
        for op, source, digest, chunks, m in w.ops:
            c.execute("DELETE FROM sources WHERE idx=? AND source=?", (w.index, source))  # cascades to chunks
            if op == "replace":
                c.execute("INSERT INTO sources VALUES (?, ?, ?)", (w.index, source, digest))
                c.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                              [(w.index, source, ch.position, ch.text, to_json(ch.metadata, "metadata"),
                                _blob(m[i])) for i, ch in enumerate(chunks)])
        c.execute("UPDATE indexes SET version=? WHERE name=?", (uuid.uuid4().hex, w.index))

    def source_digests(self, index: str) -> dict[str, str]:
        def fn(c: sqlite3.Connection) -> dict[str, str]:
            self._index_row(c, index)
            return dict(c.execute("SELECT source, digest FROM sources WHERE idx=?", (index,)).fetchall())
        return self._run(fn)

    def _load(self, index: str) -> tuple[str, list[Chunk], np.ndarray, int]:
        """(version, chunks, unit matrix, dim), read in one transaction so they agree."""
        def fn(c: sqlite3.Connection) -> tuple[str, list[Chunk], np.ndarray, int]:
            dim, _, version, _ = self._index_row(c, index)
            with self._lock:
                cached = self._matrices.get(index)
            if cached is not None and cached[0] == version:
                return cached[0], cached[1], cached[2], dim
            rows = c.execute("SELECT source, position, text, metadata, vector FROM chunks WHERE idx=? "
                             "ORDER BY source, position", (index,)).fetchall()
            chunks = [Chunk(s, p, t, json.loads(md), chunk_id(index, s, p)) for s, p, t, md, _ in rows]
            m = np.frombuffer(b"".join(r[4] for r in rows), dtype="<f4").reshape(len(rows), dim)
            m = _unit(m)
            with self._lock:
                self._matrices[index] = (version, chunks, m)
            return version, chunks, m, dim
        return self._run(fn)

    def chunks(self, index: str) -> list[Chunk]:
        return list(self._load(index)[1])

    def nearest(self, index: str, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]:
        check_k(k)
        _, chunks, m, dim = self._load(index)
        q = _unit(as_vector(vector, dim, f"query for index {index!r}"))
        scores = m @ q
        return [(chunks[i], float(scores[i])) for i in top_k(scores, k)]

    def index_version(self, index: str) -> str:
        row = self._run(lambda c: c.execute("SELECT version FROM indexes WHERE name=?", (index,)).fetchone())
        return row[0] if row else ""

    def drop_index(self, index: str) -> None:
        def fn(c: sqlite3.Connection) -> None:
            self._index_row(c, index)
            c.execute("DELETE FROM indexes WHERE name=?", (index,))  # cascades to sources and chunks
        self._run(fn, write=True)
        with self._lock:
            self._matrices.pop(index, None)

    # --- semantic cache ---
    def _bump_cache(self, c: sqlite3.Connection) -> int:
        """Increments the shared cache version; returns the version before."""
        before = c.execute("SELECT value FROM counters WHERE name='cache_version'").fetchone()[0]
        c.execute("UPDATE counters SET value=? WHERE name='cache_version'", (before + 1,))
        return before

    def cache_put(self, entry: CacheEntry) -> int:
        v = as_vector(entry.vector, None, f"cache entry for key {entry.key[:16]!r}")
        response = to_json(entry.response, "cache response")
        now = time.time()
        created = entry.created or now
        last_used = entry.last_used or created

        def fn(c: sqlite3.Connection) -> tuple[int, int]:
            row = c.execute("SELECT length(vector) FROM cache WHERE key=? LIMIT 1", (entry.key,)).fetchone()
            if row is not None and row[0] != 4 * len(v):
                as_vector(v, row[0] // 4, f"cache entry for key {entry.key[:16]!r}")
            cur = c.execute("INSERT INTO cache (key, prompt, vector, response, created, last_used) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (entry.key, entry.prompt, _blob(v), response, created,
                                                          last_used))
            return cur.lastrowid, self._bump_cache(c)

        new_id, before = self._run(fn, write=True)
        with self._lock:
            # Our own put is the only change since the matrices were read: extend them, don't reload.
            if before == self._cache_seen:
                self._cache_seen = before + 1
                if entry.key in self._cache_mats:
                    ids, m = self._cache_mats[entry.key]
                    self._cache_mats[entry.key] = (ids + [new_id], np.vstack([m, _unit(v)[None]]))
            else:
                self._cache_mats.clear()
        entry.id, entry.created, entry.last_used = new_id, created, last_used
        return new_id

    @staticmethod
    def _entry(row: tuple) -> CacheEntry:
        i, key, prompt, blob, response, created, last_used = row
        return CacheEntry(key, prompt, np.frombuffer(blob, dtype="<f4").copy(), json.loads(response),
                          created, last_used, i)

    _COLS = "id, key, prompt, vector, response, created, last_used"

    def cache_exact(self, key: str, prompt: str) -> CacheEntry | None:
        row = self._run(lambda c: c.execute(f"SELECT {self._COLS} FROM cache WHERE key=? AND prompt=? "
                                            "ORDER BY id DESC LIMIT 1", (key, prompt)).fetchone())
        return self._entry(row) if row else None

    def cache_nearest(self, key: str, vector: np.ndarray, k: int) -> list[tuple[CacheEntry, float]]:
        check_k(k)
        v = as_vector(vector, None, "cache query")

        def fn(c: sqlite3.Connection) -> list[tuple[CacheEntry, float]]:
            version = c.execute("SELECT value FROM counters WHERE name='cache_version'").fetchone()[0]
            with self._lock:
                if version != self._cache_seen:
                    self._cache_mats.clear()
                    self._cache_seen = version
                mat = self._cache_mats.get(key)
            if mat is None:
                rows = c.execute("SELECT id, vector FROM cache WHERE key=? ORDER BY id", (key,)).fetchall()
                if rows and len(rows[0][1]) != 4 * len(v):
                    as_vector(v, len(rows[0][1]) // 4, f"cache query for key {key[:16]!r}")
                m = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), len(v))
                mat = ([r[0] for r in rows], _unit(m))
                with self._lock:
                    if version == self._cache_seen:
                        self._cache_mats[key] = mat
            ids, m = mat
            if not ids:
                return []
            if m.shape[1] != len(v):
                as_vector(v, m.shape[1], f"cache query for key {key[:16]!r}")
            scores = m @ _unit(v)
            best = [(ids[i], float(scores[i])) for i in top_k(scores, k)]
            marks = ",".join("?" * len(best))
            rows = {r[0]: r for r in c.execute(f"SELECT {self._COLS} FROM cache WHERE id IN ({marks})",
                                               [i for i, _ in best])}
            return [(self._entry(rows[i]), s) for i, s in best if i in rows]
        return self._run(fn)

    def cache_touch(self, entry_id: int) -> None:
        self._run(lambda c: c.execute("UPDATE cache SET last_used=? WHERE id=?", (time.time(), entry_id)),
                  write=True)

    def _cache_change(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        def wrapped(c: sqlite3.Connection) -> int:
            n = fn(c)
            if n:
                self._bump_cache(c)
            return n
        return self._run(wrapped, write=True)

    def cache_delete(self, key: str | None = None) -> int:
        if key is None:
            return self._cache_change(lambda c: c.execute("DELETE FROM cache").rowcount)
        return self._cache_change(lambda c: c.execute("DELETE FROM cache WHERE key=?", (key,)).rowcount)

    def cache_prune(self, *, max_entries: int | None, ttl_s: float | None) -> int:
        if max_entries is not None and max_entries < 0:
            raise ConfigError(f"max_entries must be >= 0, got {max_entries}", param="max_entries")

        def fn(c: sqlite3.Connection) -> int:
            n = 0
            if ttl_s is not None:
                n += c.execute("DELETE FROM cache WHERE created < ?", (time.time() - ttl_s,)).rowcount
            if max_entries is not None:
                n += c.execute("DELETE FROM cache WHERE id IN (SELECT id FROM cache ORDER BY last_used DESC, "
                               "id DESC LIMIT -1 OFFSET ?)", (max_entries,)).rowcount
            return n
        return self._cache_change(fn)

    def cache_count(self) -> int:
        return self._run(lambda c: c.execute("SELECT count(*) FROM cache").fetchone()[0])

    # --- model registry ---
    def registry_add(self, name: str, record: dict) -> int:
        text = to_json(record, f"registry record of {name!r}")

        def fn(c: sqlite3.Connection) -> int:  # BEGIN IMMEDIATE: two pushes never read the same max
            version = c.execute("SELECT coalesce(max(version), 0) + 1 FROM models WHERE name=?", (name,)).fetchone()[0]
            c.execute("INSERT INTO models VALUES (?, ?, ?, ?)", (name, version, text, time.time()))
            return version
        return self._run(fn, write=True)

    def registry_versions(self, name: str) -> list[dict]:
        rows = self._run(lambda c: c.execute("SELECT version, record, created FROM models WHERE name=? "
                                             "ORDER BY version", (name,)).fetchall())
        return [{**json.loads(r), "name": name, "version": v, "created": t} for v, r, t in rows]

    def registry_names(self) -> list[str]:
        return self._run(lambda c: [r[0] for r in c.execute("SELECT DISTINCT name FROM models ORDER BY name")])

    def registry_aliases(self, name: str) -> dict[str, tuple[int, int | None]]:
        rows = self._run(lambda c: c.execute("SELECT alias, version, previous FROM model_aliases WHERE name=? "
                                             "ORDER BY alias", (name,)).fetchall())
        return {a: (v, p) for a, v, p in rows}

    def registry_move_alias(self, name: str, alias: str, version: int, *, expect: int | None = None) -> bool:
        def fn(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT version FROM model_aliases WHERE name=? AND alias=?", (name, alias)).fetchone()
            current = row[0] if row else None
            if expect is not None and current != expect:
                return False
            if current != version:
                c.execute("INSERT OR REPLACE INTO model_aliases VALUES (?, ?, ?, ?, ?)",
                          (name, alias, version, current, time.time()))
            return True
        return self._run(fn, write=True)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

