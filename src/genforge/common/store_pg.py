"""The shared store: PostgreSQL + pgvector, one database for several server replicas and ingest jobs
(its connections and tables: store_pg_db.py).

Every index's chunks live in one table whose `embedding` column is `vector` without a dimension, and
each index gets its own partial HNSW index over `embedding::vector(dim)` (vector_cosine_ops) `WHERE
idx = '<name>'`. pgvector can only index vectors of one dimension, and the dimension is per index;
the alternative, a table per index, would mean DDL with user-chosen names on every write path and a
separate schema per index, while this keeps one schema and still gives each index its own graph.
Queries repeat the index's expression and predicate with the name as a literal, so the planner can
match the partial index (a bind parameter in a generic plan cannot).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import psycopg
from psycopg import sql

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
    unknown_index,
    version_row,
)
from genforge.common.store_pg_db import PgDatabase

HNSW_MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search


def hnsw_name(index: str) -> str:
    return "gf_hnsw_" + hashlib.sha1(index.encode("utf-8")).hexdigest()[:16]


def nearest_sql(index: str, dim: int, k: int) -> sql.Composed:
    """The chunk search: its ORDER BY and WHERE are exactly the partial HNSW index's, so it can be used."""
    expr = sql.SQL("embedding::vector({})").format(sql.Literal(dim))
    query = sql.SQL("{q}::vector({d})").format(q=sql.Placeholder(), d=sql.Literal(dim))
    return sql.SQL("SELECT source, position, text, metadata, 1 - ({e} <=> {q}) FROM gf_chunks "
                   "WHERE idx = {name} ORDER BY {e} <=> {q} LIMIT {k}").format(
        e=expr, q=query, name=sql.Literal(index), k=sql.Literal(k))


class _PgWriter(IndexWriter):
    """Writes straight into the block's open transaction: PostgreSQL locks rows, not the database,
    so readers and other indexes' writers go on while an ingest runs."""

    def __init__(self, db: PgDatabase, conn: psycopg.Connection, index: str, dim: int):
        self._db, self._conn, self.index, self.dim = db, conn, index, dim
        self.changed = False

    def replace_source(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        m = check_source(self.index, self.dim, source, chunks, vectors)
        rows = [(self.index, source, c.position, c.text, to_json(c.metadata, "metadata"), m[i])
                for i, c in enumerate(chunks)]
        with self._db.errors(), self._conn.cursor() as cur:
            cur.execute("DELETE FROM gf_sources WHERE idx = %s AND source = %s", (self.index, source))
            cur.execute("INSERT INTO gf_sources VALUES (%s, %s, %s)", (self.index, source, str(digest)))
            cur.executemany("INSERT INTO gf_chunks VALUES (%s, %s, %s, %s, %s::jsonb, %s)", rows)
        self.changed = True

    def remove_source(self, source: str) -> None:
        with self._db.errors():
            self._conn.execute("DELETE FROM gf_sources WHERE idx = %s AND source = %s", (self.index, source))
        self.changed = True


class PgStore(Store):
    def __init__(self, url: str):
        self._db = PgDatabase(url)
        self.url = self._db.url

    def _dim(self, conn: psycopg.Connection, index: str, *, lock: bool = False) -> int:
        row = conn.execute("SELECT dim FROM gf_indexes WHERE name = %s" + (" FOR UPDATE" if lock else ""),
                           (index,)).fetchone()
        if row is None:
            raise unknown_index(index, [r[0] for r in conn.execute("SELECT name FROM gf_indexes")])
        return row[0]

    # --- document indexes ---
    def create_index(self, index: str, *, dim: int, embedder: str) -> None:
        check_new_index(index, dim)

        def fn(c: psycopg.Connection) -> None:
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("gf_index:" + index,))
            row = c.execute("SELECT dim, embedder FROM gf_indexes WHERE name = %s", (index,)).fetchone()
            if row is not None:
                if tuple(row) != (dim, embedder):
                    raise index_mismatch(index, tuple(row), dim, embedder)
                return
            c.execute("INSERT INTO gf_indexes (name, dim, embedder, version) VALUES (%s, %s, %s, %s)",
                      (index, dim, embedder, uuid.uuid4().hex))
        self._db.tx(fn)

    def index_info(self, index: str) -> dict | None:
        def fn(c: psycopg.Connection) -> dict | None:
            row = c.execute("SELECT dim, embedder, version, meta, "
                            "(SELECT count(*) FROM gf_chunks WHERE idx = %s), "
                            "(SELECT count(*) FROM gf_sources WHERE idx = %s) "
                            "FROM gf_indexes WHERE name = %s", (index, index, index)).fetchone()
            if row is None:
                return None
            return index_info_row(index, *row)
        return self._db.tx(fn)

    def indexes(self) -> list[str]:
        return self._db.tx(lambda c: [r[0] for r in c.execute("SELECT name FROM gf_indexes ORDER BY name")])

    def set_index_meta(self, index: str, meta: dict) -> None:
        text = to_json(meta, f"meta of index {index!r}")

        def fn(c: psycopg.Connection) -> None:
            self._dim(c, index, lock=True)
            c.execute("UPDATE gf_indexes SET meta = meta || %s::jsonb WHERE name = %s", (text, index))
        self._db.tx(fn)

    @contextmanager
    def write(self, index: str) -> Iterator[IndexWriter]:
        # The index row is locked FOR UPDATE: writers of one index take turns, everyone else goes on.
        with self._db.errors(), self._db.connection(check=True) as (conn, _), conn.transaction():
            writer = _PgWriter(self._db, conn, index, self._dim(conn, index, lock=True))
            yield writer
            if writer.changed:
                conn.execute("UPDATE gf_indexes SET version = %s WHERE name = %s", (uuid.uuid4().hex, index))
        if writer.changed:
            self._ensure_hnsw(index, writer.dim)

    def _ensure_hnsw(self, index: str, dim: int) -> None:
        """Builds the index's HNSW graph once its first chunks are committed.

        Building it over the loaded rows takes ~8 s for 20k x 384; keeping it up to date row by row
        during that first load took 80 s. CONCURRENTLY blocks neither readers nor writers (searches
        scan exactly until it is ready); later writes update it incrementally.
        """
        name = hnsw_name(index)
        valid = "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE c.relname = %s"
        with self._db.errors(), self._db.connection() as (conn, _):
            row = conn.execute(valid, (name,)).fetchone()
            if row is not None and row[0]:
                return
            # A session lock, so one process builds while the others go on without waiting.
            if not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,)).fetchone()[0]:
                return
            try:
                row = conn.execute(valid, (name,)).fetchone()
                if row is not None and not row[0]:  # a build that was interrupted leaves an invalid index
                    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
                if row is None or not row[0]:
                    conn.execute(sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON gf_chunks USING hnsw "
                                         "((embedding::vector({})) vector_cosine_ops) WHERE idx = {}").format(
                        sql.Identifier(name), sql.Literal(dim), sql.Literal(index)))
                    # fresh row counts, or the planner keeps estimating an empty table and sorts instead
                    conn.execute("ANALYZE gf_chunks")
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))

    def source_digests(self, index: str) -> dict[str, str]:
        def fn(c: psycopg.Connection) -> dict[str, str]:
            self._dim(c, index)
            return dict(c.execute("SELECT source, digest FROM gf_sources WHERE idx = %s", (index,)).fetchall())
        return self._db.tx(fn)

    def chunks(self, index: str) -> list[Chunk]:
        def fn(c: psycopg.Connection) -> list[Chunk]:
            self._dim(c, index)
            # COLLATE "C": byte order, the same order the SQLite backend gives
            rows = c.execute('SELECT source, position, text, metadata FROM gf_chunks WHERE idx = %s '
                             'ORDER BY source COLLATE "C", position', (index,)).fetchall()
            return [Chunk(s, p, t, md, chunk_id(index, s, p)) for s, p, t, md in rows]
        return self._db.tx(fn)

    def nearest(self, index: str, vector: np.ndarray, k: int) -> list[tuple[Chunk, float]]:
        check_k(k)

        def fn(c: psycopg.Connection) -> list[tuple[Chunk, float]]:
            dim = self._dim(c, index)
            q = as_vector(vector, dim, f"query for index {index!r}")
            # HNSW returns at most ef_search rows; beyond its cap only an exact scan gives k
            c.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(
                sql.Literal(min(HNSW_MAX_EF_SEARCH, max(40, k)))))
            if k > HNSW_MAX_EF_SEARCH:
                c.execute("SET LOCAL enable_indexscan = off")
            rows = c.execute(nearest_sql(index, dim, k), (q, q)).fetchall()
            return [(Chunk(s, p, t, md, chunk_id(index, s, p)), float(score)) for s, p, t, md, score in rows]
        return self._db.tx(fn)

    def index_version(self, index: str) -> str:
        row = self._db.tx(lambda c: c.execute("SELECT version FROM gf_indexes WHERE name = %s", (index,)).fetchone())
        return row[0] if row else ""

    def drop_index(self, index: str) -> None:
        def fn(c: psycopg.Connection) -> None:
            self._dim(c, index, lock=True)
            c.execute("DELETE FROM gf_indexes WHERE name = %s", (index,))  # cascades to sources and chunks
            c.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(hnsw_name(index))))
        self._db.tx(fn)

    # --- semantic cache ---
    # No ANN index on the cache: a search only ever looks at one exact key's rows (found through the
    # btree on key), and an HNSW graph filtered to a few rows of one key would miss most of them.
    _COLS = "id, key, prompt, embedding, response, created, last_used"

    @staticmethod
    def _entry(row: tuple) -> CacheEntry:
        i, key, prompt, vec, response, created, last_used = row
        return CacheEntry(key, prompt, vec.to_numpy().astype(np.float32), response, created, last_used, i)

    def _check_cache_dim(self, c: psycopg.Connection, key: str, v: np.ndarray, what: str) -> None:
        row = c.execute("SELECT vector_dims(embedding) FROM gf_cache WHERE key = %s LIMIT 1", (key,)).fetchone()
        if row is not None and row[0] != len(v):
            as_vector(v, row[0], what)

    def cache_put(self, entry: CacheEntry) -> int:
        v, response, created, last_used = new_cache_row(entry)

        def fn(c: psycopg.Connection) -> int:
            self._check_cache_dim(c, entry.key, v, f"cache entry for key {entry.key[:16]!r}")
            return c.execute("INSERT INTO gf_cache (key, prompt, embedding, response, created, last_used) "
                             "VALUES (%s, %s, %s, %s::jsonb, %s, %s) RETURNING id",
                             (entry.key, entry.prompt, v, response, created, last_used)).fetchone()[0]
        new_id = self._db.tx(fn)
        entry.id, entry.created, entry.last_used = new_id, created, last_used
        return new_id

    def cache_exact(self, key: str, prompt: str) -> CacheEntry | None:
        row = self._db.tx(lambda c: c.execute(f"SELECT {self._COLS} FROM gf_cache WHERE key = %s AND prompt = %s "
                                              "ORDER BY id DESC LIMIT 1", (key, prompt)).fetchone())
        return self._entry(row) if row else None

    def cache_nearest(self, key: str, vector: np.ndarray, k: int) -> list[tuple[CacheEntry, float]]:
        check_k(k)
        v = as_vector(vector, None, "cache query")

        def fn(c: psycopg.Connection) -> list[tuple[CacheEntry, float]]:
            self._check_cache_dim(c, key, v, f"cache query for key {key[:16]!r}")
            rows = c.execute(f"SELECT {self._COLS}, 1 - (embedding <=> %s) AS score FROM gf_cache "
                             "WHERE key = %s ORDER BY embedding <=> %s, id LIMIT %s", (v, key, v, k)).fetchall()
            return [(self._entry(r[:7]), float(r[7])) for r in rows]
        return self._db.tx(fn)

    def cache_touch(self, entry_id: int) -> None:
        self._db.tx(lambda c: c.execute("UPDATE gf_cache SET last_used = %s WHERE id = %s", (time.time(), entry_id)))

    def cache_delete(self, key: str | None = None) -> int:
        if key is None:
            return self._db.tx(lambda c: c.execute("DELETE FROM gf_cache").rowcount)
        return self._db.tx(lambda c: c.execute("DELETE FROM gf_cache WHERE key = %s", (key,)).rowcount)

    def cache_prune(self, *, max_entries: int | None, ttl_s: float | None) -> int:
        check_prune(max_entries)

        def fn(c: psycopg.Connection) -> int:
            n = 0
            if ttl_s is not None:
                n += c.execute("DELETE FROM gf_cache WHERE created < %s", (time.time() - ttl_s,)).rowcount
            if max_entries is not None:
                n += c.execute("DELETE FROM gf_cache WHERE id IN (SELECT id FROM gf_cache "
                               "ORDER BY last_used DESC, id DESC OFFSET %s)", (max_entries,)).rowcount
            return n
        return self._db.tx(fn)

    def cache_count(self) -> int:
        return self._db.tx(lambda c: c.execute("SELECT count(*) FROM gf_cache").fetchone()[0])

    # --- model registry ---
    def registry_add(self, name: str, record: dict) -> int:
        text = to_json(record, f"registry record of {name!r}")

        def fn(c: psycopg.Connection) -> int:
            # one push of a name at a time (replicas, CI jobs): the next number is read and taken atomically
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("gf_model:" + name,))
            version = c.execute("SELECT coalesce(max(version), 0) + 1 FROM gf_models WHERE name = %s",
                                (name,)).fetchone()[0]
            c.execute("INSERT INTO gf_models VALUES (%s, %s, %s::jsonb, %s)", (name, version, text, time.time()))
            return version
        return self._db.tx(fn)

    def registry_versions(self, name: str) -> list[dict]:
        rows = self._db.tx(lambda c: c.execute("SELECT version, record, created FROM gf_models WHERE name = %s "
                                               "ORDER BY version", (name,)).fetchall())
        return [version_row(name, v, r, t) for v, r, t in rows]

    def registry_names(self) -> list[str]:
        return self._db.tx(lambda c: [r[0] for r in c.execute(
            'SELECT DISTINCT name COLLATE "C" FROM gf_models ORDER BY 1')])

    def registry_aliases(self, name: str) -> dict[str, tuple[int, int | None]]:
        rows = self._db.tx(lambda c: c.execute("SELECT alias, version, previous FROM gf_model_aliases "
                                               'WHERE name = %s ORDER BY alias COLLATE "C"', (name,)).fetchall())
        return {a: (v, p) for a, v, p in rows}

    def registry_move_alias(self, name: str, alias: str, version: int, *, expect: int | None = None) -> bool:
        def fn(c: psycopg.Connection) -> bool:
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"gf_alias:{name}@{alias}",))
            row = c.execute("SELECT version FROM gf_model_aliases WHERE name = %s AND alias = %s",
                            (name, alias)).fetchone()
            current = row[0] if row else None
            move = alias_move(current, version, expect)
            if move:
                c.execute("INSERT INTO gf_model_aliases VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name, alias) "
                          "DO UPDATE SET version = excluded.version, previous = excluded.previous, "
                          "updated = excluded.updated", (name, alias, version, current, time.time()))
            return move is not False
        return self._db.tx(fn)

    def close(self) -> None:
        self._db.close()
