"""The shared store's database: PostgreSQL + pgvector, its tables, its connections and transactions,
and what a failure to reach it says (never the password). The queries are in store_pg.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from pgvector.psycopg import register_vector
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from genforge.common.errors import ConfigError, DataError
from genforge.common.store import StoreUnavailable
from genforge.common.store_backend import ConnectionPool

T = TypeVar("T")
CONNECT_TIMEOUT_S = 5

SCHEMA = """
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


def _reusable(conn: psycopg.Connection) -> bool:
    """Not closed, not broken (the server restarted), no transaction left open."""
    return not (conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE)


class PgDatabase:
    """One database at `url`, reached through a pool of autocommit connections (with pgvector's types
    registered); the first connection creates the tables."""

    def __init__(self, url: str):
        self.url = redact_url(url)
        try:
            info = conninfo_to_dict(url)
        except psycopg.ProgrammingError as e:
            raise ConfigError(f"store URL {self.url!r} is not a valid PostgreSQL URL: {e}", param="store") from e
        self._conninfo = url
        self._password = str(info.get("password") or "")
        self._where = (f"host {info.get('host') or 'localhost'}, port {info.get('port') or 5432}, "
                       f"database {info.get('dbname') or info.get('user') or '(default)'}")
        self._schema_ready = False
        self._pool = ConnectionPool(self._connect, _reusable, ping=lambda conn: conn.execute("SELECT 1"))
        with self.errors(opening=True):
            self._pool.give_back(self._connect())

    def _connect(self) -> psycopg.Connection:
        kwargs = {} if "connect_timeout" in conninfo_to_dict(self._conninfo) else \
            {"connect_timeout": CONNECT_TIMEOUT_S}
        conn = psycopg.connect(self._conninfo, autocommit=True, **kwargs)
        try:
            if not self._schema_ready:
                self._create_schema(conn)
                self._schema_ready = True
            register_vector(conn)
        except BaseException:
            conn.close()
            raise
        return conn

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
            conn.execute(SCHEMA)

    @contextmanager
    def errors(self, *, opening: bool = False) -> Iterator[None]:
        """psycopg's connection failures as StoreUnavailable (one line, the password masked), its
        refusals of data as DataError."""
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

    def connection(self, *, check: bool = False) -> AbstractContextManager[tuple[psycopg.Connection, bool]]:
        """A pooled connection (and whether it was reused); `check`: ping a reused one first."""
        return self._pool.connection(check=check)

    def tx(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """fn in one transaction; retried once on a fresh connection if a pooled one had gone stale."""
        reused = False
        try:
            with self.errors(), self._pool.connection() as (conn, reused), conn.transaction():
                return fn(conn)
        except StoreUnavailable:
            if not reused:
                raise
        # The server restarted or dropped us: the other idle connections are as stale as that one.
        self._pool.close_idle()
        with self.errors(), self._pool.connection() as (conn, _), conn.transaction():
            return fn(conn)

    def close(self) -> None:
        self._pool.close()
