"""The shared store: PostgreSQL + pgvector, one database for several server replicas and ingest jobs.

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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from genforge.common.errors import ConfigError, DataError
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
    unknown_index,
)

T = TypeVar("T")
CONNECT_TIMEOUT_S = 5
MAX_IDLE_CONNECTIONS = 8
HNSW_MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gf_indexes (name text PRIMARY KEY, dim integer NOT NULL, embedder text NOT NULL,
    version text NOT NULL, meta jsonb NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS gf_sources (idx text NOT NULL REFERENCES gf_indexes(name) ON DELETE CASCADE,
    source text NOT NULL, digest text NOT NULL, PRIMARY KEY (idx, source));
CREATE TABLE IF NOT EXISTS gf_chunks (idx text NOT NULL, source text NOT NULL, position integer NOT NULL,
    text text NOT NULL, metadata jsonb NOT NULL, embedding vector NOT NULL,
    PRIMARY KEY (idx, source, position),
    FOREIGN KEY (idx, source) REFERENCES gf_sources(idx, source) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS gf_cache (id bigserial PRIMARY KEY, key text NOT NULL, prompt text NOT NULL,
    embedding vector NOT NULL, response jsonb NOT NULL, created double precision NOT NULL,
    last_used double precision NOT NULL);
CREATE INDEX IF NOT EXISTS gf_cache_key ON gf_cache (key);
CREATE INDEX IF NOT EXISTS gf_cache_last_used ON gf_cache (last_used);
CREATE TABLE IF NOT EXISTS gf_models (name text NOT NULL, version integer NOT NULL, record jsonb NOT NULL,
    created double precision NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS gf_model_aliases (name text NOT NULL, alias text NOT NULL, version integer NOT NULL,
    previous integer, updated double precision NOT NULL, PRIMARY KEY (name, alias));
"""
_SCHEMA_LOCK = 0x67660001  # advisory lock id: two processes opening a new database create tables once


def redact_url(url: str) -> str:
    """The URL without its password (user info or `password=` query parameter), for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}@{hostport}"
    query = "&".join(p for p in parts.query.split("&") if p and not p.lower().startswith("password="))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def hnsw_name(index: str) -> str:
    return "gf_hnsw_" + hashlib.sha1(index.encode("utf-8")).hexdigest()[:16]


def nearest_sql(index: str, dim: int, k: int) -> sql.Composed:
    """The chunk search: its ORDER BY and WHERE are exactly the partial HNSW index's, so it can be used."""
    expr = sql.SQL("embedding::vector({})").format(sql.Literal(dim))
    query = sql.SQL("{q}::vector({d})").format(q=sql.Placeholder(), d=sql.Literal(dim))
    return sql.SQL("SELECT source, position, text, metadata, 1 - ({e} <=> {q}) FROM gf_chunks "
                   "WHERE idx = {name} ORDER BY {e} <=> {q} LIMIT {k}").format(
        e=expr, q=query, name=sql.Literal(index), k=sql.Literal(k))


class _Pool:
    """A few open connections shared by threads: one is checked out per operation, then put back.

    psycopg_pool is not a dependency; this is the part of it we need. Broken connections (the server
    restarted) are dropped on return, so the next operation opens a fresh one.
    """

    def __init__(self, conninfo: str, prepare: Callable[[psycopg.Connection], None]):
        self._conninfo, self._prepare = conninfo, prepare
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def connect(self) -> psycopg.Connection:
        kwargs = {} if "connect_timeout" in conninfo_to_dict(self._conninfo) else \
            {"connect_timeout": CONNECT_TIMEOUT_S}
        conn = psycopg.connect(self._conninfo, autocommit=True, **kwargs)
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def connection(self, *, check: bool = False) -> Iterator[tuple[psycopg.Connection, bool]]:
        """(connection, whether it was reused from the pool rather than opened just now).

        check: ping a reused connection first, for work that cannot simply be retried if it has gone stale.
        """
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and check:
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                conn.close()
                conn = None
        reused = conn is not None
        if conn is None:
            conn = self.connect()
        try:
            yield conn, reused
        finally:
            self.add(conn)

    def add(self, conn: psycopg.Connection) -> None:
        """Keeps a healthy idle connection for reuse, closes anything else."""
        if not (conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE):
            with self._lock:
                if not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
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
            self._closed = True
        self.close_idle()


class _PgWriter(IndexWriter):
    """Writes straight into the block's open transaction: PostgreSQL locks rows, not the database,
    so readers and other indexes' writers go on while an ingest runs."""

    def __init__(self, store: PgStore, conn: psycopg.Connection, index: str, dim: int):
        self._store, self._conn, self.index, self.dim = store, conn, index, dim
        self.changed = False

    def replace_source(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        check_chunks(source, chunks)
        m = as_matrix(vectors, len(chunks), self.dim, f"index {self.index!r}, source {source!r}")
        rows = [(self.index, source, c.position, c.text, to_json(c.metadata, f"metadata of {source!r}"), m[i])
                for i, c in enumerate(chunks)]
        with self._store._errors(), self._conn.cursor() as cur:
            cur.execute("DELETE FROM gf_sources WHERE idx = %s AND source = %s", (self.index, source))
            cur.execute("INSERT INTO gf_sources VALUES (%s, %s, %s)", (self.index, source, str(digest)))
            cur.executemany("INSERT INTO gf_chunks VALUES (%s, %s, %s, %s, %s::jsonb, %s)", rows)
        self.changed = True

    def remove_source(self, source: str) -> None:
        with self._store._errors():
            self._conn.execute("DELETE FROM gf_sources WHERE idx = %s AND source = %s", (self.index, source))
        self.changed = True


class PgStore(Store):
    def __init__(self, url: str):
        self.url = redact_url(url)
        try:
            info = conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise ConfigError(f"store URL {self.url!r} is not a valid PostgreSQL URL: {e}", param="store") from e
        self._password = str(info.get("password") or "")
        self._where = (f"host {info.get('host') or 'localhost'}, port {info.get('port') or 5432}, "
                       f"database {info.get('dbname') or info.get('user') or '(default)'}")
        self._schema_ready = False
        self._pool = _Pool(url, self._prepare)
        with self._errors(opening=True):
            self._pool.add(self._pool.connect())

    def _prepare(self, conn: psycopg.Connection) -> None:
        """Runs on every new connection; the first one also creates the tables."""
        if not self._schema_ready:
            self._create_schema(conn)
            self._schema_ready = True
        register_vector(conn)

    def _create_schema(self, conn: psycopg.Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
                try:
                    conn.execute("CREATE EXTENSION vector")
                except psycopg.DatabaseError as e:
                    raise ConfigError(f"pgvector is not available in PostgreSQL at {self._where} ({e}); "
                                      "install pgvector on the server and run `CREATE EXTENSION vector` in "
                                      "that database as a superuser", param="store") from e
            conn.execute(_SCHEMA)

    # --- connections and error mapping ---
    @contextmanager
    def _errors(self, *, opening: bool = False) -> Iterator[None]:
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            reason = " ".join(str(e).split())  # one line: the CLI prints errors on one
            if self._password:
                reason = reason.replace(self._password, "***")
            if opening:
                raise StoreUnavailable(
                    f"cannot reach the PostgreSQL store {self.url} ({self._where}): {reason}. Check that "
                    "the server is running and accepts connections there, that the database exists and "
                    "the user may log in; or leave out --store to use the embedded store") from e
            raise StoreUnavailable(f"the PostgreSQL store {self.url} ({self._where}) is unavailable: "
                                   f"{reason}. Check that the server is running; the next request "
                                   "reconnects") from e
        except psycopg.DataError as e:
            raise DataError(f"the PostgreSQL store {self.url} refused the data: {e}") from e

    def _tx(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """fn in one transaction; retried once on a fresh connection if a pooled one had gone stale."""
        reused = False
        try:
            with self._errors(), self._pool.connection() as (conn, reused), conn.transaction():
                return fn(conn)
        except StoreUnavailable:
            if not reused:
                raise
        # The server restarted or dropped us: the other idle connections are as stale as that one.
        self._pool.close_idle()
        with self._errors(), self._pool.connection() as (conn, _), conn.transaction():
            return fn(conn)

    def _dim(self, conn: psycopg.Connection, index: str, *, lock: bool = False) -> int:
        row = conn.execute("SELECT dim FROM gf_indexes WHERE name = %s" + (" FOR UPDATE" if lock else ""),
                           (index,)).fetchone()
        if row is None:
            raise unknown_index(index, [r[0] for r in conn.execute("SELECT name FROM gf_indexes")])
        return row[0]

    # --- document indexes ---
    def create_index(self, index: str, *, dim: int, embedder: str) -> None:
        check_index_name(index)
        if not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"index {index!r}: dim must be a positive integer, got {dim!r}", param="dim")

        def fn(c: psycopg.Connection) -> None:
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("gf_index:" + index,))
            row = c.execute("SELECT dim, embedder FROM gf_indexes WHERE name = %s", (index,)).fetchone()
            if row is not None:
                if tuple(row) != (dim, embedder):
                    raise ConfigError(f"index {index!r} holds {row[0]}-dim vectors of {row[1]!r}, not {dim}-dim "
                                      f"of {embedder!r}; use that embedder, another index name, or drop the index",
                                      param="index")
                return
            c.execute("INSERT INTO gf_indexes (name, dim, embedder, version) VALUES (%s, %s, %s, %s)",
                      (index, dim, embedder, uuid.uuid4().hex))
        self._tx(fn)

    def index_info(self, index: str) -> dict | None:
        def fn(c: psycopg.Connection) -> dict | None:
            row = c.execute("SELECT dim, embedder, version, meta, "
                            "(SELECT count(*) FROM gf_chunks WHERE idx = %s), "
                            "(SELECT count(*) FROM gf_sources WHERE idx = %s) "
                            "FROM gf_indexes WHERE name = %s", (index, index, index)).fetchone()
            if row is None:
                return None
            return {"name": index, "dim": row[0], "embedder": row[1], "chunks": row[4], "sources": row[5],
                    "version": row[2], "meta": row[3]}
        return self._tx(fn)

    def indexes(self) -> list[str]:
        return self._tx(lambda c: [r[0] for r in c.execute("SELECT name FROM gf_indexes ORDER BY name")])

    def set_index_meta(self, index: str, meta: dict) -> None:
        text = to_json(meta, f"meta of index {index!r}")

        def fn(c: psycopg.Connection) -> None:
            self._dim(c, index, lock=True)
            c.execute("UPDATE gf_indexes SET meta = meta || %s::jsonb WHERE name = %s", (text, index))
        self._tx(fn)

    @contextmanager
    def write(self, index: str) -> Iterator[IndexWriter]:
        # The index row is locked FOR UPDATE: writers of one index take turns, everyone else goes on.
        with self._errors(), self._pool.connection(check=True) as (conn, _), conn.transaction():
            writer = _PgWriter(self, conn, index, self._dim(conn, index, lock=True))
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
        with self._errors(), self._pool.connection() as (conn, _):
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
        return self._tx(fn)

    def chunks(self, index: str) -> list[Chunk]:
        def fn(c: psycopg.Connection) -> list[Chunk]:
            self._dim(c, index)
            # COLLATE "C": byte order, the same order the SQLite backend gives
            rows = c.execute('SELECT source, position, text, metadata FROM gf_chunks WHERE idx = %s '
                             'ORDER BY source COLLATE "C", position', (index,)).fetchall()
            return [Chunk(s, p, t, md, chunk_id(index, s, p)) for s, p, t, md in rows]
        return self._tx(fn)

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
        return self._tx(fn)

    def index_version(self, index: str) -> str:
        row = self._tx(lambda c: c.execute("SELECT version FROM gf_indexes WHERE name = %s", (index,)).fetchone())
        return row[0] if row else ""

    def drop_index(self, index: str) -> None:
        def fn(c: psycopg.Connection) -> None:
            self._dim(c, index, lock=True)
            c.execute("DELETE FROM gf_indexes WHERE name = %s", (index,))  # cascades to sources and chunks
            c.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(hnsw_name(index))))
        self._tx(fn)

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
        what = f"cache entry for key {entry.key[:16]!r}"
        v = as_vector(entry.vector, None, what)
        response = to_json(entry.response, "cache response")
        created = entry.created or time.time()
        last_used = entry.last_used or created

        def fn(c: psycopg.Connection) -> int:
            self._check_cache_dim(c, entry.key, v, what)
            return c.execute("INSERT INTO gf_cache (key, prompt, embedding, response, created, last_used) "
                             "VALUES (%s, %s, %s, %s::jsonb, %s, %s) RETURNING id",
                             (entry.key, entry.prompt, v, response, created, last_used)).fetchone()[0]
        new_id = self._tx(fn)
        entry.id, entry.created, entry.last_used = new_id, created, last_used
        return new_id

    def cache_exact(self, key: str, prompt: str) -> CacheEntry | None:
        row = self._tx(lambda c: c.execute(f"SELECT {self._COLS} FROM gf_cache WHERE key = %s AND prompt = %s "
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
        return self._tx(fn)

    def cache_touch(self, entry_id: int) -> None:
        self._tx(lambda c: c.execute("UPDATE gf_cache SET last_used = %s WHERE id = %s", (time.time(), entry_id)))

    def cache_delete(self, key: str | None = None) -> int:
        if key is None:
            return self._tx(lambda c: c.execute("DELETE FROM gf_cache").rowcount)
        return self._tx(lambda c: c.execute("DELETE FROM gf_cache WHERE key = %s", (key,)).rowcount)

    def cache_prune(self, *, max_entries: int | None, ttl_s: float | None) -> int:
        if max_entries is not None and max_entries < 0:
            raise ConfigError(f"max_entries must be >= 0, got {max_entries}", param="max_entries")

        def fn(c: psycopg.Connection) -> int:
            n = 0
            if ttl_s is not None:
                n += c.execute("DELETE FROM gf_cache WHERE created < %s", (time.time() - ttl_s,)).rowcount
            if max_entries is not None:
                n += c.execute("DELETE FROM gf_cache WHERE id IN (SELECT id FROM gf_cache "
                               "ORDER BY last_used DESC, id DESC OFFSET %s)", (max_entries,)).rowcount
            return n
        return self._tx(fn)

    def cache_count(self) -> int:
        return self._tx(lambda c: c.execute("SELECT count(*) FROM gf_cache").fetchone()[0])

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
        return self._tx(fn)

    def registry_versions(self, name: str) -> list[dict]:
        rows = self._tx(lambda c: c.execute("SELECT version, record, created FROM gf_models WHERE name = %s "
                                            "ORDER BY version", (name,)).fetchall())
        return [{**r, "name": name, "version": v, "created": t} for v, r, t in rows]

    def registry_names(self) -> list[str]:
        return self._tx(lambda c: [r[0] for r in c.execute(
            'SELECT DISTINCT name COLLATE "C" FROM gf_models ORDER BY 1')])

    def registry_aliases(self, name: str) -> dict[str, tuple[int, int | None]]:
        rows = self._tx(lambda c: c.execute("SELECT alias, version, previous FROM gf_model_aliases "
                                            'WHERE name = %s ORDER BY alias COLLATE "C"', (name,)).fetchall())
        return {a: (v, p) for a, v, p in rows}

    def registry_move_alias(self, name: str, alias: str, version: int, *, expect: int | None = None) -> bool:
        def fn(c: psycopg.Connection) -> bool:
            c.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"gf_alias:{name}@{alias}",))
            row = c.execute("SELECT version FROM gf_model_aliases WHERE name = %s AND alias = %s",
                            (name, alias)).fetchone()
            current = row[0] if row else None
            if expect is not None and current != expect:
                return False
            if current != version:
                c.execute("INSERT INTO gf_model_aliases VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name, alias) "
                          "DO UPDATE SET version = excluded.version, previous = excluded.previous, "
                          "updated = excluded.updated", (name, alias, version, current, time.time()))
            return True
        return self._tx(fn)

    def close(self) -> None:
        self._pool.close()
