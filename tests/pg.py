"""A real PostgreSQL with pgvector for tests, started through the `pgserver` package (no mocks)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

_db_numbers = itertools.count()


def start_pg(root: Path):
    """Starts (or reuses) a server whose data lives in root/pgdata, with pgvector in every new database.

    Returns the pgserver handle; `handle.cleanup()` stops it.
    """
    pgserver = pytest.importorskip("pgserver", reason="pgserver is not installed (pip install -e '.[dev]')")
    import psycopg

    server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
    # template1 is what CREATE DATABASE copies, so every test database starts with the extension.
    for db in ("template1", "postgres"):
        with psycopg.connect(server.get_uri(db), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return server


def fresh_database(server) -> str:
    """A new, empty database on `server`; returns its URI."""
    import psycopg

    name = f"test_{next(_db_numbers)}"
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.get_uri(name)
