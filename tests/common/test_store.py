"""The storage interface on both backends: embedded SQLite and PostgreSQL + pgvector (a real server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from genforge.common.errors import ConfigError, DataError, NotFoundError
from genforge.common.store import CacheEntry, Chunk, Store, StoreUnavailable, open_store

DIM = 8
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(params=["sqlite", "pg"])
def store_url(request, tmp_path) -> str:
    """A fresh store location: a state folder, or a database of its own on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "state")
    return request.getfixturevalue("pg_store_url")


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
    yield s
    s.close()


def unit(rows: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def chunks_of(source: str, n: int) -> list[Chunk]:
    return [Chunk(source, i, f"{source} chunk {i}", {"start": i * 10, "end": i * 10 + 9}) for i in range(n)]


def fill(store: Store, index: str = "docs", sources: int = 3, per: int = 4, seed: int = 0) -> np.ndarray:
    """Creates `index` with `sources` sources of `per` chunks; returns the vectors in (source, position) order."""
    store.create_index(index, dim=DIM, embedder="test-emb@1")
    vecs = unit(sources * per, seed=seed)
    with store.write(index) as w:
        for s in range(sources):
            w.replace_source(f"doc{s}.txt", f"digest{s}", chunks_of(f"doc{s}.txt", per), vecs[s * per:(s + 1) * per])
    return vecs


def snapshot(store: Store, index: str = "docs") -> tuple:
    return ([(c.source, c.position, c.text, c.metadata, c.id) for c in store.chunks(index)],
            store.source_digests(index), store.index_version(index))


# --- indexes ---

def test_create_index_is_idempotent_and_refuses_another_dim_or_embedder(store):
    store.create_index("docs", dim=DIM, embedder="test-emb@1")
    store.create_index("docs", dim=DIM, embedder="test-emb@1")
    assert store.indexes() == ["docs"]
    with pytest.raises(ConfigError, match="8-dim"):
        store.create_index("docs", dim=16, embedder="test-emb@1")
    with pytest.raises(ConfigError, match="other-emb"):
        store.create_index("docs", dim=DIM, embedder="other-emb")
    with pytest.raises(ConfigError, match="not valid"):
        store.create_index("bad name:x", dim=DIM, embedder="e")
    info = store.index_info("docs")
    assert info["name"] == "docs" and info["dim"] == DIM and info["embedder"] == "test-emb@1"
    assert info["chunks"] == 0 and info["sources"] == 0 and info["meta"] == {} and info["version"]
    assert store.index_info("nope") is None


def test_write_and_read_back_chunks_digests_and_info(store):
    fill(store)
    chunks = store.chunks("docs")
    assert [(c.source, c.position) for c in chunks] == [(f"doc{s}.txt", p) for s in range(3) for p in range(4)]
    assert chunks[5].text == "doc1.txt chunk 1" and chunks[5].metadata == {"start": 10, "end": 19}
    import hashlib
    assert chunks[5].id == f"docs:{hashlib.sha1(b'doc1.txt').hexdigest()[:10]}:1"
    assert store.source_digests("docs") == {"doc0.txt": "digest0", "doc1.txt": "digest1", "doc2.txt": "digest2"}
    info = store.index_info("docs")
    assert (info["chunks"], info["sources"]) == (12, 3)


def test_replace_source_drops_old_positions_and_remove_source_drops_all(store):
    fill(store)
    with store.write("docs") as w:
        w.replace_source("doc1.txt", "digest1b", [Chunk("doc1.txt", 0, "new text", {})], unit(1, seed=9))
        w.remove_source("doc2.txt")
    chunks = store.chunks("docs")
    assert [(c.source, c.position, c.text) for c in chunks if c.source == "doc1.txt"] == [("doc1.txt", 0, "new text")]
    assert not [c for c in chunks if c.source == "doc2.txt"]
    assert store.source_digests("docs") == {"doc0.txt": "digest0", "doc1.txt": "digest1b"}
    assert store.index_info("docs")["chunks"] == 5
    with pytest.raises(DataError, match="NUL"):
        with store.write("docs") as w:
            w.replace_source("doc0.txt", "d", [Chunk("doc0.txt", 0, "a\x00b", {})], unit(1))
    with pytest.raises(DataError, match="one vector per chunk"):
        with store.write("docs") as w:
            w.replace_source("doc0.txt", "d", chunks_of("doc0.txt", 2), unit(3))
    assert store.index_info("docs")["chunks"] == 5


def test_nearest_ranks_by_cosine_and_checks_dim_and_index(store):
    vecs = fill(store)
    q = unit(1, seed=42)[0]
    got = store.nearest("docs", q, k=5)
    expect = np.argsort(-(vecs @ q))[:5]
    assert [c.text for c, _ in got] == [f"doc{i // 4}.txt chunk {i % 4}" for i in expect]
    np.testing.assert_allclose([s for _, s in got], (vecs @ q)[expect], atol=1e-5)
    assert len(store.nearest("docs", q, k=100)) == 12
    with pytest.raises(ConfigError, match=r"\(8,\)"):
        store.nearest("docs", np.ones(5, np.float32), k=3)
    with pytest.raises(NotFoundError, match="'nope'.*docs"):
        store.nearest("nope", q, k=3)
    with pytest.raises(NotFoundError):
        store.chunks("nope")
    with pytest.raises(NotFoundError):
        store.source_digests("nope")
    with pytest.raises(ConfigError):
        with store.write("docs") as w:
            w.replace_source("x.txt", "d", chunks_of("x.txt", 2), unit(2, dim=5))


def test_index_version_changes_on_each_commit_only(store):
    assert store.index_version("docs") == ""
    store.create_index("docs", dim=DIM, embedder="test-emb@1")
    v0 = store.index_version("docs")
    assert v0 and store.index_version("docs") == v0
    fill(store)
    v1 = store.index_version("docs")
    store.nearest("docs", unit(1)[0], 3)
    store.set_index_meta("docs", {"default_mode": "hybrid"})
    store.set_index_meta("docs", {"k": 5})
    assert store.index_info("docs")["meta"] == {"default_mode": "hybrid", "k": 5}
    assert v1 != v0 and store.index_version("docs") == v1
    with store.write("docs") as w:
        w.remove_source("doc0.txt")
    assert store.index_version("docs") not in (v0, v1)


def test_an_exception_in_the_write_block_changes_nothing(store):
    fill(store)
    before = snapshot(store)
    with pytest.raises(RuntimeError):
        with store.write("docs") as w:
            w.replace_source("doc0.txt", "changed", chunks_of("doc0.txt", 1), unit(1))
            w.remove_source("doc1.txt")
            w.replace_source("new.txt", "n", chunks_of("new.txt", 2), unit(2))
            raise RuntimeError("ingest failed half way")
    assert snapshot(store) == before


def test_a_writer_killed_mid_block_leaves_the_index_as_before(store, store_url):
    fill(store)
    before = snapshot(store)
    script = textwrap.dedent("""
        import sys, time, numpy as np
        from genforge.common.store import Chunk, open_store
        s = open_store(sys.argv[1])
        with s.write("docs") as w:
            w.remove_source("doc0.txt")
            for i in range(50):
                src = f"doc{i}.txt"
                w.replace_source(src, "killed", [Chunk(src, p, "x", {}) for p in range(3)],
                                 np.ones((3, 8), np.float32) / 8 ** 0.5)
            print("ready", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    child = subprocess.Popen([sys.executable, "-c", script, store_url], stdout=subprocess.PIPE, env=env)
    assert child.stdout.readline().strip() == b"ready"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    assert snapshot(store) == before
    with open_store(store_url) as other:
        assert snapshot(other) == before
    with store.write("docs") as w:  # the dead writer holds no lock
        w.remove_source("doc0.txt")
    assert "doc0.txt" not in store.source_digests("docs")


def test_a_restart_loses_nothing(store_url):
    with open_store(store_url) as s:
        vecs = fill(s)
        s.set_index_meta("docs", {"default_mode": "dense"})
        s.cache_put(CacheEntry("k1", "hello", unit(1)[0], {"text": "hi"}))
        before = snapshot(s)
    with open_store(store_url) as s:
        assert snapshot(s) == before
        assert s.index_info("docs")["meta"] == {"default_mode": "dense"}
        assert s.nearest("docs", vecs[7], 1)[0][0].text == "doc1.txt chunk 3"
        hit = s.cache_exact("k1", "hello")
        assert hit.response == {"text": "hi"}
        np.testing.assert_allclose(hit.vector, unit(1)[0], atol=1e-6)


def test_two_stores_on_one_location_see_each_others_writes(store_url):
    with open_store(store_url) as a, open_store(store_url) as b:
        fill(a)
        assert b.index_version("docs") == a.index_version("docs")
        q = unit(1, seed=3)[0]
        assert [c.id for c, _ in b.nearest("docs", q, 3)] == [c.id for c, _ in a.nearest("docs", q, 3)]
        v = a.index_version("docs")
        with b.write("docs") as w:
            w.replace_source("doc9.txt", "d9", [Chunk("doc9.txt", 0, "exactly q", {})], q[None])
        assert a.index_version("docs") != v
        assert a.nearest("docs", q, 1)[0][0].text == "exactly q"  # a's in-memory matrix was reloaded
        a.cache_put(CacheEntry("k", "p1", unit(1, seed=5)[0], {"n": 1}))
        assert b.cache_nearest("k", unit(1, seed=5)[0], 1)[0][0].response == {"n": 1}
        b.cache_put(CacheEntry("k", "p2", q, {"n": 2}))
        assert a.cache_nearest("k", q, 1)[0][0].response == {"n": 2}
        b.cache_delete("k")
        assert a.cache_nearest("k", q, 1) == []


def test_two_processes_write_at_once(store, store_url):
    store.create_index("docs", dim=DIM, embedder="test-emb@1")
    script = textwrap.dedent("""
        import sys, numpy as np
        from genforge.common.store import CacheEntry, Chunk, open_store
        s, me = open_store(sys.argv[1]), sys.argv[2]
        v = np.ones(8, np.float32) / 8 ** 0.5
        for i in range(30):
            s.cache_put(CacheEntry("k", f"{me}-{i}", v, {"i": i}))
            with s.write("docs") as w:
                w.replace_source(f"{me}.txt", str(i), [Chunk(f"{me}.txt", 0, "x", {})], v[None])
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    children = [subprocess.Popen([sys.executable, "-c", script, store_url, name], env=env) for name in "ab"]
    assert [c.wait(timeout=60) for c in children] == [0, 0]
    assert store.cache_count() == 60
    assert store.source_digests("docs") == {"a.txt": "29", "b.txt": "29"}


def test_drop_index(store):
    fill(store)
    store.create_index("other", dim=4, embedder="e")
    store.drop_index("docs")
    assert store.indexes() == ["other"] and store.index_version("docs") == ""
    with pytest.raises(NotFoundError, match="other"):
        store.chunks("docs")
    store.create_index("docs", dim=16, embedder="e2")
    assert store.chunks("docs") == [] and store.index_info("docs")["dim"] == 16


# --- semantic cache ---

def test_cache_exact_needs_the_same_key_and_prompt(store):
    v = unit(1)[0]
    e = CacheEntry("key-a", "What is 2+2?", v, {"text": "4"})
    i = store.cache_put(e)
    assert e.id == i and e.created > 0 and e.last_used == e.created
    got = store.cache_exact("key-a", "What is 2+2?")
    assert got.id == i and got.response == {"text": "4"} and got.prompt == "What is 2+2?"
    assert store.cache_exact("key-b", "What is 2+2?") is None
    assert store.cache_exact("key-a", "what is 2+2?") is None


def test_cache_nearest_stays_within_its_key(store):
    vecs = unit(6, seed=1)
    for i in range(3):
        store.cache_put(CacheEntry("key-a", f"a{i}", vecs[i], {"i": i}))
        store.cache_put(CacheEntry("key-b", f"b{i}", vecs[i + 3], {"i": i + 3}))
    got = store.cache_nearest("key-a", vecs[4], 10)
    assert {e.key for e, _ in got} == {"key-a"} and len(got) == 3
    assert [e.response["i"] for e, _ in got] == list(np.argsort(-(vecs[:3] @ vecs[4])))
    best, score = store.cache_nearest("key-b", vecs[4], 1)[0]
    assert best.prompt == "b1" and score == pytest.approx(1.0, abs=1e-5)
    assert store.cache_nearest("key-c", vecs[0], 3) == []
    with pytest.raises(ConfigError):
        store.cache_nearest("key-a", np.ones(3, np.float32), 1)
    with pytest.raises(ConfigError):
        store.cache_put(CacheEntry("key-a", "wrong dim", np.ones(3, np.float32), {}))


def test_cache_delete_by_key_or_all_and_count(store):
    for key in ("a", "a", "b", "c"):
        store.cache_put(CacheEntry(key, "p", unit(1)[0], {}))
    assert store.cache_count() == 4
    assert store.cache_delete("a") == 2
    assert store.cache_exact("a", "p") is None and store.cache_exact("b", "p") is not None
    assert store.cache_delete() == 2 and store.cache_count() == 0


def test_cache_prune_drops_expired_then_least_recently_used(store):
    now = time.time()
    ids = [store.cache_put(CacheEntry("k", f"p{i}", unit(1, seed=i)[0], {"i": i}, created=now - 100 + i,
                                      last_used=now - 100 + i)) for i in range(6)]
    store.cache_put(CacheEntry("k", "old", unit(1)[0], {}, created=now - 10_000))  # expired
    assert store.cache_prune(max_entries=None, ttl_s=5_000) == 1
    store.cache_touch(ids[0])  # p0 becomes the most recently used
    got = store.cache_exact("k", "p0")
    assert got.last_used >= now
    assert store.cache_prune(max_entries=3, ttl_s=None) == 3
    left = sorted(e.prompt for e, _ in store.cache_nearest("k", unit(1)[0], 10))
    assert left == ["p0", "p4", "p5"] and store.cache_count() == 3
    assert store.cache_prune(max_entries=10, ttl_s=None) == 0


def test_threads_share_one_store(store):
    fill(store)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(10):
                v = unit(1, seed=100 * t + i)[0]
                store.cache_put(CacheEntry(f"key{t % 2}", f"{t}-{i}", v, {"t": t}))
                assert store.cache_nearest(f"key{t % 2}", v, 1)[0][1] == pytest.approx(1.0, abs=1e-5)
                assert len(store.nearest("docs", v, 3)) == 3
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert store.cache_count() == 60


# --- errors ---

def test_a_state_dir_that_cannot_be_created_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--state-dir"):
        open_store(tmp_path / "file" / "state")
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_store("mysql://localhost/db")


def test_sqlite_nearest_over_20k_chunks_takes_milliseconds(tmp_path):
    with open_store(tmp_path) as s:
        s.create_index("big", dim=384, embedder="e")
        m = unit(20_000, dim=384, seed=1)
        with s.write("big") as w:
            for i in range(200):
                src = f"s{i:03d}"
                w.replace_source(src, "d", [Chunk(src, p, "text", {}) for p in range(100)],
                                 m[i * 100:(i + 1) * 100])
        assert s.nearest("big", m[123], 1)[0][0].id.endswith(":23")  # loads and caches the matrix
        times = []
        for i in range(20):
            t = time.perf_counter()
            best = s.nearest("big", m[i], 5)
            times.append(time.perf_counter() - t)
            assert best[0][1] == pytest.approx(1.0, abs=1e-5)
        # ~8 ms median on a shared 2-core machine (a 30 MB matrix-vector product); reloading every call
        # would cost ~200 ms
        assert np.median(times) < 0.05, times


# --- PostgreSQL only ---

def test_pg_unreachable_url_is_store_unavailable_naming_where_without_password():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(StoreUnavailable) as err:
        open_store(f"postgresql://alice:s3cret@127.0.0.1:{port}/ragdb")
    msg = str(err.value)
    assert "127.0.0.1" in msg and str(port) in msg and "ragdb" in msg and "s3cret" not in msg
    assert "alice@127.0.0.1" in msg and err.value.status == 503


def test_pg_database_going_away_raises_store_unavailable_and_coming_back_recovers(pg_store_url, pg_url):
    import psycopg

    dbname = psycopg.conninfo.conninfo_to_dict(pg_store_url)["dbname"]

    def admin(statement: str) -> None:
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute(statement)

    with open_store(pg_store_url) as s:
        fill(s)
        s.cache_put(CacheEntry("k", "p", unit(1)[0], {}))
        # To the store this is the database going away: its connections drop and new ones are refused.
        admin(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS false")
        admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{dbname}'")
        calls = [lambda: s.nearest("docs", unit(1)[0], 3), lambda: s.index_version("docs"),
                 lambda: s.cache_exact("k", "p"), lambda: s.cache_put(CacheEntry("k", "q", unit(1)[0], {})),
                 lambda: s.chunks("docs")]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="is unavailable.*not currently accepting connections"):
                call()
        with pytest.raises(StoreUnavailable):
            with s.write("docs") as w:
                w.remove_source("doc0.txt")
        admin(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS true")
        assert len(s.nearest("docs", unit(1)[0], 3)) == 3  # no reopen needed
        assert s.cache_exact("k", "q") is None and s.cache_count() == 1  # the failed put wrote nothing


def test_pg_reconnects_after_its_connections_are_dropped(pg_store_url, pg_url):
    import psycopg

    dbname = psycopg.conninfo.conninfo_to_dict(pg_store_url)["dbname"]

    def drop_connections() -> int:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            return admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE datname = %s", (dbname,)).fetchone()[0]

    with open_store(pg_store_url) as s:
        fill(s)
        with s.write("docs"):  # holds one connection while the search opens a second: two in the pool
            s.nearest("docs", unit(1)[0], 3)
        assert drop_connections() == 2
        assert len(s.nearest("docs", unit(1)[0], 3)) == 3  # every stale pooled connection is replaced
        assert drop_connections() >= 1
        with s.write("docs") as w:  # a write block checks its connection before it starts
            w.remove_source("doc0.txt")
        assert "doc0.txt" not in s.source_digests("docs")


def test_pg_search_uses_the_indexs_partial_hnsw_index_built_after_the_first_write(pg_store_url):
    import psycopg
    from pgvector.psycopg import register_vector

    from genforge.common.store_pg import hnsw_name, nearest_sql

    def hnsw_defs() -> dict[str, str]:
        with psycopg.connect(pg_store_url) as c:
            return dict(c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'gf_hnsw_%'"))

    with open_store(pg_store_url) as s:
        s.create_index("other", dim=4, embedder="e")
        assert hnsw_defs() == {}
        fill(s)
        with s.write("other") as w:
            w.replace_source("a.txt", "d", chunks_of("a.txt", 1), unit(1, dim=4))
        defs = hnsw_defs()
        assert "hnsw" in defs[hnsw_name("docs")] and "vector_cosine_ops" in defs[hnsw_name("docs")]
        assert "vector(4)" in defs[hnsw_name("other")] and "'other'" in defs[hnsw_name("other")]
        with psycopg.connect(pg_store_url, autocommit=True) as c:
            register_vector(c)
            c.execute("SET enable_seqscan = off")  # 12 rows: the planner would rather scan and sort them
            c.execute("SET enable_sort = off")
            plan = "\n".join(r[0] for r in c.execute(sql_explain(nearest_sql("docs", DIM, 5)), (unit(1)[0],) * 2))
            assert f"Index Scan using {hnsw_name('docs')}" in plan, plan
        vecs = fill(s, sources=4, seed=1)  # later writes keep it up to date
        best, score = s.nearest("docs", vecs[13], 1)[0]
        assert (best.source, best.position, score) == ("doc3.txt", 1, pytest.approx(1.0, abs=1e-5))
        s.drop_index("docs")
        assert list(hnsw_defs()) == [hnsw_name("other")]


def sql_explain(query):
    from psycopg import sql

    return sql.SQL("EXPLAIN ") + query
