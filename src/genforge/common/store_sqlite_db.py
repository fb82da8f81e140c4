"""The embedded store's database: the SQLite file, its tables, its connections and transactions.

WAL mode lets readers run while one process writes; the busy timeout makes a second writer wait
instead of failing. The queries are in store_sqlite.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from genforge.common.errors import ConfigError
from genforge.common.store import StoreUnavailable
from genforge.common.store_backend import ConnectionPool

T = TypeVar("T")
BUSY_TIMEOUT_S = 30.0

SCHEMA = """
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


class SqliteDatabase:
    """`<state_dir>/store.sqlite3`, shared by threads (one pooled connection per running operation)
    and processes (SQLite's file locks)."""

    def __init__(self, state_dir: str | Path):
        root = Path(state_dir).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"state folder {str(root)!r} cannot be created ({e.strerror}); pass a writable "
                              "folder with --state-dir", param="state_dir") from e
        self.path = root / "store.sqlite3"
        self._pool = ConnectionPool(self._connect, lambda conn: not conn.in_transaction)
        try:
            with self._connection() as conn:
                conn.executescript(SCHEMA)
        except sqlite3.Error as e:
            self.close()
            raise ConfigError(f"store {self.path} cannot be opened ({e}); pass a writable folder with "
                              "--state-dir, or move a damaged store.sqlite3 away", param="state_dir") from e

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a transaction spans what we say.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        if self._pool.closed:
            raise StoreUnavailable(f"store {self.path} is closed")
        with self._pool.connection() as (conn, _):
            yield conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"store {self.path} cannot be used: {e}; check that the file is on a "
                                   "writable local disk and not locked by another program") from e
        except sqlite3.DatabaseError as e:
            raise StoreUnavailable(f"store {self.path} is not a usable SQLite database ({e}); move it "
                                   "away and start again with an empty state folder") from e

    def run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool = False) -> T:
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

    def close(self) -> None:
        self._pool.close()
