"""The embedded store: document indexes, the semantic cache and the model registry in one SQLite file
(its connections and tables: store_sqlite_db.py).

Vectors are float32 BLOBs and search is numpy brute force over a matrix kept in memory until the
index's version changes (20k x 384 is a few ms, so no ANN index is needed here).
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

import numpy as np

from genforge.common.errors import ConfigError
from genforge.common.store import CacheEntry, Chunk, IndexWriter, Store
from genforge.common.store_backend import (
    alias_move,
    as_vector,
    check_k,
    check_new_index,
    check_prune,
    check_source,
    chunk_id,
    index_info_row,
    index_mismatch,
    new_cache_row,
    to_json,
    top_k,
    unknown_index,
    version_row,
)
from genforge.common.store_sqlite_db import SqliteDatabase


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
        m = check_source(self.index, self.dim, source, chunks, vectors)
        self.ops.append(("replace", source, str(digest), list(chunks), m.copy()))

    def remove_source(self, source: str) -> None:
        self.ops.append(("remove", source, "", [], None))


class SqliteStore(Store):
    def __init__(self, state_dir: str | Path):
        self._db = SqliteDatabase(state_dir)
        self.path = self._db.path
        self.url = str(self.path)
        self._lock = threading.Lock()
        # index -> (version, chunks, unit matrix); key -> (ids, unit matrix) valid at _cache_seen
        self._matrices: dict[str, tuple[str, list[Chunk], np.ndarray]] = {}
        self._cache_mats: dict[str, tuple[list[int], np.ndarray]] = {}
        self._cache_seen = -1

    def _index_row(self, conn: sqlite3.Connection, index: str) -> tuple[int, str, str, str]:
        row = conn.execute("SELECT dim, embedder, version, meta FROM indexes WHERE name=?", (index,)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT name FROM indexes")]
            raise unknown_index(index, known)
        return row

    # --- document indexes ---
    def create_index(self, index: str, *, dim: int, embedder: str) -> None:
        check_new_index(index, dim)

        def fn(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT dim, embedder FROM indexes WHERE name=?", (index,)).fetchone()
            if row is None:
                c.execute("INSERT INTO indexes (name, dim, embedder, version) VALUES (?, ?, ?, ?)",
                          (index, dim, embedder, uuid.uuid4().hex))
            elif tuple(row) != (dim, embedder):
                raise index_mismatch(index, tuple(row), dim, embedder)
        self._db.run(fn, write=True)

    def index_info(self, index: str) -> dict | None:
        def fn(c: sqlite3.Connection) -> dict | None:
            row = c.execute("SELECT dim, embedder, version, meta FROM indexes WHERE name=?", (index,)).fetchone()
            if row is None:
                return None
            n_chunks = c.execute("SELECT count(*) FROM chunks WHERE idx=?", (index,)).fetchone()[0]
            n_sources = c.execute("SELECT count(*) FROM sources WHERE idx=?", (index,)).fetchone()[0]
            return index_info_row(index, row[0], row[1], row[2], json.loads(row[3]), n_chunks, n_sources)
        return self._db.run(fn)

    def indexes(self) -> list[str]:
        return self._db.run(lambda c: [r[0] for r in c.execute("SELECT name FROM indexes ORDER BY name")])

    def set_index_meta(self, index: str, meta: dict) -> None:
        text = to_json(meta, f"meta of index {index!r}")

        def fn(c: sqlite3.Connection) -> None:
            merged = {**json.loads(self._index_row(c, index)[3]), **json.loads(text)}
            c.execute("UPDATE indexes SET meta=? WHERE name=?", (to_json(merged, "meta"), index))
        self._db.run(fn, write=True)

    @contextmanager
    def write(self, index: str) -> Iterator[IndexWriter]:
        dim = self._db.run(lambda c: self._index_row(c, index))[0]
        writer = _BufferedWriter(index, dim)
        yield writer
        if writer.ops:
            self._db.run(lambda c: self._apply(c, writer), write=True)

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
        return self._db.run(fn)

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
        return self._db.run(fn)

    def chunks(self, index: str) -> list[Chunk]:
        return list(self._load(index)[1])

    def nearest(self, index: str, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]:
        check_k(k)
        _, chunks, m, dim = self._load(index)
        q = _unit(as_vector(vector, dim, f"query for index {index!r}"))
        scores = m @ q
        return [(chunks[i], float(scores[i])) for i in top_k(scores, k)]

    def index_version(self, index: str) -> str:
        row = self._db.run(lambda c: c.execute("SELECT version FROM indexes WHERE name=?", (index,)).fetchone())
        return row[0] if row else ""

    def drop_index(self, index: str) -> None:
        def fn(c: sqlite3.Connection) -> None:
            self._index_row(c, index)
            c.execute("DELETE FROM indexes WHERE name=?", (index,))  # cascades to sources and chunks
        self._db.run(fn, write=True)
        with self._lock:
            self._matrices.pop(index, None)

    # --- semantic cache ---
    def _bump_cache(self, c: sqlite3.Connection) -> int:
        """Increments the shared cache version; returns the version before."""
        before = c.execute("SELECT value FROM counters WHERE name='cache_version'").fetchone()[0]
        c.execute("UPDATE counters SET value=? WHERE name='cache_version'", (before + 1,))
        return before

    def cache_put(self, entry: CacheEntry) -> int:
        v, response, created, last_used = new_cache_row(entry)

        def fn(c: sqlite3.Connection) -> tuple[int, int]:
            row = c.execute("SELECT length(vector) FROM cache WHERE key=? LIMIT 1", (entry.key,)).fetchone()
            if row is not None and row[0] != 4 * len(v):
                as_vector(v, row[0] // 4, f"cache entry for key {entry.key[:16]!r}")
            cur = c.execute("INSERT INTO cache (key, prompt, vector, response, created, last_used) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (entry.key, entry.prompt, _blob(v), response, created,
                                                          last_used))
            return cur.lastrowid, self._bump_cache(c)

        new_id, before = self._db.run(fn, write=True)
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
        row = self._db.run(lambda c: c.execute(f"SELECT {self._COLS} FROM cache WHERE key=? AND prompt=? "
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
        return self._db.run(fn)

    def cache_touch(self, entry_id: int) -> None:
        self._db.run(lambda c: c.execute("UPDATE cache SET last_used=? WHERE id=?", (time.time(), entry_id)),
                     write=True)

    def _cache_change(self, fn: Callable[[sqlite3.Connection], int]) -> int:
        def wrapped(c: sqlite3.Connection) -> int:
            n = fn(c)
            if n:
                self._bump_cache(c)
            return n
        return self._db.run(wrapped, write=True)

    def cache_delete(self, key: str | None = None) -> int:
        if key is None:
            return self._cache_change(lambda c: c.execute("DELETE FROM cache").rowcount)
        return self._cache_change(lambda c: c.execute("DELETE FROM cache WHERE key=?", (key,)).rowcount)

    def cache_prune(self, *, max_entries: int | None, ttl_s: float | None) -> int:
        check_prune(max_entries)

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
        return self._db.run(lambda c: c.execute("SELECT count(*) FROM cache").fetchone()[0])

    # --- model registry ---
    def registry_add(self, name: str, record: dict) -> int:
        text = to_json(record, f"registry record of {name!r}")

        def fn(c: sqlite3.Connection) -> int:  # BEGIN IMMEDIATE: two pushes never read the same max
            version = c.execute("SELECT coalesce(max(version), 0) + 1 FROM models WHERE name=?", (name,)).fetchone()[0]
            c.execute("INSERT INTO models VALUES (?, ?, ?, ?)", (name, version, text, time.time()))
            return version
        return self._db.run(fn, write=True)

    def registry_versions(self, name: str) -> list[dict]:
        rows = self._db.run(lambda c: c.execute("SELECT version, record, created FROM models WHERE name=? "
                                                "ORDER BY version", (name,)).fetchall())
        return [version_row(name, v, json.loads(r), t) for v, r, t in rows]

    def registry_names(self) -> list[str]:
        return self._db.run(lambda c: [r[0] for r in c.execute("SELECT DISTINCT name FROM models ORDER BY name")])

    def registry_aliases(self, name: str) -> dict[str, tuple[int, int | None]]:
        rows = self._db.run(lambda c: c.execute("SELECT alias, version, previous FROM model_aliases "
                                                "WHERE name=? ORDER BY alias", (name,)).fetchall())
        return {a: (v, p) for a, v, p in rows}

    def registry_move_alias(self, name: str, alias: str, version: int, *, expect: int | None = None) -> bool:
        def fn(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT version FROM model_aliases WHERE name=? AND alias=?", (name, alias)).fetchone()
            current = row[0] if row else None
            move = alias_move(current, version, expect)
            if move:
                c.execute("INSERT OR REPLACE INTO model_aliases VALUES (?, ?, ?, ?, ?)",
                          (name, alias, version, current, time.time()))
            return move is not False
        return self._db.run(fn, write=True)

    def close(self) -> None:
        self._db.close()

