"""Bad input to the application layer, through the real `genforge` commands: each is one clear line
and exit 2 at start, or an OpenAI-style error while serving; nothing is half-written.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL_NAME, free_socket
from .processes import answer, ask, error_lines, genforge, serving

pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.slow

# A minimal valid PDF (one page, no text) would parse; this one is cut off after its header.
BROKEN_PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n2 0 obj\n<< /Type /Pa"


def one_error(done, *needles: str) -> str:
    """The run exited 2 with exactly one `error:` line (no traceback) that names every needle."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def own_pg():
    """A PostgreSQL of this module's own, so stopping it does not take the session's server away."""
    from tests.pg import running_pg

    with running_pg() as server:
        yield server


# ---------------------------------------------------------------- refused at start


def test_rag_on_a_short_context_model_warns_at_start_and_still_answers(lm_run: Path, tmp_path: Path):
    from genforge.jobs.rag import ingest

    (tmp_path / "tides.txt").write_text("The moon's pull raises the tides twice a day.", encoding="utf-8")
    ingest([str(tmp_path / "tides.txt")], "docs", str(tmp_path / "state"))
    with serving(lm_run, ["--rag", "docs", "--store", str(tmp_path / "state")], logs=tmp_path) as (server,):
        r = ask(server, "Why are there tides?", max_tokens=50)  # 128-token context: no room for a source
        assert r.status_code == 200 and "sources" not in r.json()
        log = server.log.read_text()
    assert "warning: the model's context is 128 tokens" in log


def test_serve_with_an_unknown_rag_index_names_it_and_the_known_ones(lm_run: Path, tmp_path: Path):
    from genforge.common.store import open_store

    with open_store(tmp_path / "state") as store:
        for name in ("docs", "manuals"):
            store.create_index(name, dim=384, embedder="all-MiniLM-L6-v2@test")
    done = genforge("serve", str(lm_run), "--rag", "nope", "--store", str(tmp_path / "state"),
                    "--port", str(free_socket().getsockname()[1]))
    one_error(done, "--rag nope", "'nope'", "docs", "manuals", "genforge rag ingest")
    with open_store(tmp_path / "state") as store:
        assert store.indexes() == ["docs", "manuals"]  # nothing created or dropped on the way out


def test_serve_with_a_store_on_a_closed_port_says_so_at_start(lm_run: Path):
    sock = free_socket()  # bound, never listening: connections to it are refused
    port = sock.getsockname()[1]
    try:
        done = genforge("serve", str(lm_run), "--cache", "--store", f"postgresql://alice:s3cret@127.0.0.1:{port}/ragdb")
    finally:
        sock.close()
    one_error(done, "PostgreSQL", "127.0.0.1", str(port), "ragdb")
    assert "s3cret" not in done.stderr + done.stdout and "serving" not in done.stdout


def test_serve_with_a_missing_embedder_folder_says_which(lm_run: Path, tmp_path: Path):
    done = genforge("serve", str(lm_run), "--cache", "--state-dir", str(tmp_path), "--embedder", "/does/not/exist")
    one_error(done, "/does/not/exist", "sentence-transformers")


@pytest.mark.parametrize("config, needles", [
    ("guard:\n  policy: block\n  banned: ['ok', '(unclosed']\n", ["guard.banned[1]", "'(unclosed'", "regular expression"]),
    ("guard:\n  policy: redact\n  allowlist: ['[a-']\n", ["guard.allowlist[0]", "'[a-'"]),
    ("cache:\n  enabled: true\n  treshold: 0.8\n", ["cache.treshold", "threshold"]),
    ("colour: red\n", ["colour", "cache, embedder, guard, own_process, process_priority, process_threads, rag, store"]),
], ids=["banned-regex", "allowlist-regex", "misspelt-key", "unknown-section"])
def test_a_bad_serve_config_file_is_one_line_before_anything_loads(lm_run: Path, tmp_path: Path, capsys,
                                                                   config, needles):
    from genforge.cli import main

    path = tmp_path / "serve.yaml"
    path.write_text(config)
    # In-process: the file is checked before the model loads, so nothing here binds a port or loads weights
    code = main(["serve", str(lm_run), "--config", str(path)])
    out = capsys.readouterr()
    one_error(subprocess.CompletedProcess([], code, out.out, out.err), *needles)


# ---------------------------------------------------------------- while serving


def test_a_database_that_goes_down_while_serving_gives_503_then_recovers(lm_run: Path, own_pg, tmp_path: Path):
    import pgserver

    question, streamed = "What does the pass statement do?", "What does the del statement do?"
    # One batch slot: the streamed request's 16 choices decode one after another (about a second), so
    # the database is down before its answer is complete and goes to the cache.
    long_stream = {"stream": True, "n": 16, "max_tokens": 60, "ignore_eos": True}
    args = ["--cache", "--store", own_pg.get_uri("postgres"), "--max-batch-size", "1"]
    restarted = None
    with serving(lm_run, args, logs=tmp_path) as (server,):
        state, text, _ = answer(ask(server, question))
        assert state == "miss"
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": streamed}], "temperature": 0,
                **long_stream}
        with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as r:
            assert r.headers["x-genforge-cache"] == "miss"  # the lookup is done, the answer is not
            own_pg.cleanup()  # stops PostgreSQL: its connections close and new ones are refused
            events = [line for line in r.iter_lines() if line]
        try:
            # the answer still arrives whole and ends properly; only its cache entry is lost
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            finished = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
            assert sorted(c["index"] for c in finished) == list(range(16))
            assert "answer not cached" in server.log.read_text()
            for response in (ask(server, question), ask(server, "What does the yield statement do?"),
                             ask(server, question, stream=True)):
                assert response.status_code == 503, response.text
                assert int(response.headers["retry-after"]) > 0
                error = response.json()["error"]
                assert error["type"] == "store_unavailable" and "PostgreSQL" in error["message"]
                assert set(error) == {"message", "type", "param", "code"}
            # what needs no store still works: a sampled request never looks in the cache
            sampled = ask(server, question, temperature=0.8)
            assert sampled.status_code == 200 and sampled.headers["x-genforge-cache"] == "bypass"
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            restarted = pgserver.get_server(own_pg.pgdata, cleanup_mode="stop")
            # the same server process reconnects; the entry stored before the outage is still there
            assert answer(ask(server, question)) == ("hit", text, [])
            again = {k: v for k, v in long_stream.items() if k != "stream"}
            assert answer(ask(server, streamed, **again))[0] == "miss"  # nothing half-stored
            assert answer(ask(server, streamed, **again))[0] == "hit"
        finally:
            if restarted is not None:
                restarted.cleanup()
    assert "Traceback" not in server.log.read_text()


# ---------------------------------------------------------------- genforge rag


def test_ingest_skips_empty_and_broken_files_names_them_and_indexes_the_rest(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "empty.txt").write_text("")
    (docs / "broken.pdf").write_bytes(BROKEN_PDF)
    (docs / "good.md").write_text("# Tides\n\nThe moon's pull raises the tides twice a day.\n")
    store = str(tmp_path / "state")
    done = genforge("rag", "ingest", str(docs), "--index", "notes", "--store", store)
    assert done.returncode == 0, done.stderr
    assert "ingested: 1" in done.stdout and "index_chunks: 1" in done.stdout
    skipped = [line for line in done.stdout.splitlines() if line.strip().startswith("not indexed: ")]
    assert len(skipped) == 2, done.stdout  # each failure once
    assert any("empty.txt" in line and "empty" in line.split(":", 2)[2] for line in skipped), done.stdout
    assert any("broken.pdf" in line and "PDF" in line for line in skipped), done.stdout
    assert "EOF marker" not in done.stderr  # pypdf's own log stays out of the output
    nothing = genforge("rag", "ingest", str(docs / "empty.txt"), "--index", "empty", "--store", store)
    one_error(nothing, "nothing to index", "empty.txt")
    assert "empty" not in genforge("rag", "query", "nope", "x", "--store", store).stderr.split("known:")[1]
    found = genforge("rag", "query", "notes", "Why are there tides?", "--store", store)
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith("1. ") and "good.md#0" in found.stdout and "empty.txt" not in found.stdout
    one_error(genforge("rag", "query", "nope", "Why are there tides?", "--store", store), "'nope'", "notes")
