"""`genforge serve` as real processes sharing one store: two replicas on one PostgreSQL + pgvector
database share the semantic cache and the document index, and the embedded store survives a restart.

    genforge rag ingest DOCS --index docs --store postgresql://...      (a subprocess)
    genforge serve MODEL --cache --rag docs --store postgresql://...    (twice, on two ports)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL_NAME, ROOT, CliServer, _genforge_command, free_socket

pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.slow

# One intra-op thread per child: two servers and an ingest share the machine's cores, and OpenMP's
# spin-waiting makes every one of them many times slower when they oversubscribe it.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ZEBRA = "Every zebra has a stripe pattern of its own, like a fingerprint: no two zebras share one.\n"
VOLCANO = "Volcanoes erupt when magma rises through cracks in the crust and lava pours out of the vent.\n"


def genforge(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `genforge ARGS...` to completion; stdout and stderr as text."""
    return subprocess.run([*_genforge_command(), *args], capture_output=True, text=True, timeout=timeout,
                          env=CHILD_ENV, cwd=ROOT)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _wait_healthy(server: CliServer, deadline: float) -> None:
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"genforge serve exited with {server.proc.returncode}:\n{server.log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"genforge serve did not come up:\n{server.log.read_text()}")
        time.sleep(0.2)


def _stop(server: CliServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@contextlib.contextmanager
def serving(model: Path, *argsets: list[str], logs: Path) -> Iterator[list[CliServer]]:
    """`genforge serve MODEL ARGS...` once per argument list, each on a free port; all start at once
    (their model and embedder loads overlap) and are stopped with SIGTERM on exit."""
    servers = []
    try:
        for args in argsets:
            sock = free_socket()
            port = sock.getsockname()[1]
            sock.close()  # the CLI binds it itself; the gap is a few milliseconds
            log = logs / f"serve-{port}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([*_genforge_command(), "serve", str(model), "--port", str(port),
                                         "--served-model-name", MODEL_NAME, "--enforce-eager", *args], stdout=out, stderr=subprocess.STDOUT,
                                        env=CHILD_ENV, cwd=ROOT)
            servers.append(CliServer(f"http://127.0.0.1:{port}", proc=proc, log=log))
        deadline = time.monotonic() + 120
        for server in servers:
            _wait_healthy(server, deadline)
        yield servers
    finally:
        for server in servers:
            _stop(server)


def ask(server: CliServer, question: str, **kw) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}], "max_tokens": 8,
            "temperature": 0, **kw}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


def answer(response: httpx.Response) -> tuple[str, str, list[str]]:
    """(cache header, answer text, names of the cited files) of a 200 chat response."""
    assert response.status_code == 200, response.text
    body = response.json()
    return (response.headers["x-genforge-cache"], body["choices"][0]["message"]["content"],
            [Path(s["source"]).name for s in body.get("sources") or []])


@pytest.fixture(scope="module")
def long_model(lm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lm_run's model as a plain Hugging Face folder with a 1024-token context.

    Its 128 tokens cannot hold the RAG prompt (instructions + a numbered source + the question);
    the model is Llama-style with rotary positions, so a longer limit needs no new weights."""
    folder = tmp_path_factory.mktemp("long") / "nano-long"
    shutil.copytree(lm_run / "model", folder)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        path = folder / name
        settings = json.loads(path.read_text())
        settings[key] = 1024
        path.write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def shared(pg_server, long_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(store url, docs folder, [replica A, replica B]): both serve one model on one database."""
    from tests.pg import fresh_database

    url = fresh_database(pg_server)
    root = tmp_path_factory.mktemp("replicas")
    docs = root / "docs"
    docs.mkdir()
    (docs / "zebra.txt").write_text(ZEBRA)
    done = genforge("rag", "ingest", str(docs), "--index", "docs", "--store", url)
    assert done.returncode == 0, done.stderr
    # k 1, dense: the one cited source is the best match, so `sources` shows what retrieval found
    config = root / "serve.yaml"
    config.write_text("rag:\n  k: 1\n  mode: dense\n")
    args = ["--cache", "--rag", "docs", "--store", url, "--config", str(config)]
    with serving(long_model, args, args, logs=root) as replicas:
        yield url, docs, replicas


def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(shared):
    _, _, (a, b) = shared
    question = "How do I open a file for reading in Python?"
    state, text, cited = answer(ask(a, question))
    assert state == "miss"
    hit = ask(b, question)
    assert answer(hit) == ("hit", text, cited)
    assert float(hit.headers["x-genforge-cache-similarity"]) == 1.0
    # A reworded question is found by the vector search in PostgreSQL, not only by its exact text
    near = ask(b, "In Python, how can I open a file to read it?")
    assert answer(near)[:2] == ("hit", text) and float(near.headers["x-genforge-cache-similarity"]) < 1.0
    # A different question, and the same one with other sampling settings, are not hits on either
    assert answer(ask(a, "How do I delete a file in Python?"))[0] == "miss"
    assert answer(ask(b, question, max_tokens=5))[0] == "miss"


def test_a_document_ingested_once_is_retrieved_by_both(shared):
    _, _, (a, b) = shared
    # two questions, so each replica retrieves for itself rather than replaying the other's answer
    for server, question in ((a, "What is unique about the stripes of a zebra?"),
                             (b, "Do two zebras ever have the same stripes?")):
        assert answer(ask(server, question))[::2] == ("miss", ["zebra.txt"])


def test_a_document_ingested_after_both_started_is_seen_by_both(shared):
    url, docs, (a, b) = shared
    question = "Why does lava come out of a volcano?"
    assert answer(ask(a, question))[::2] == ("miss", ["zebra.txt"])  # the only document so far
    assert answer(ask(b, question))[::2] == ("hit", ["zebra.txt"])
    (docs / "volcano.txt").write_text(VOLCANO)
    done = genforge("rag", "ingest", str(docs), "--index", "docs", "--store", url)
    assert done.returncode == 0, done.stderr
    assert "ingested: 1" in done.stdout and "unchanged: 1" in done.stdout  # zebra.txt was unchanged
    # The index version is part of the cache key: the answer grounded in the old index is not reused
    state, text, cited = answer(ask(b, question))
    assert (state, cited) == ("miss", ["volcano.txt"])
    assert answer(ask(a, question)) == ("hit", text, ["volcano.txt"])
    # and A's own retrieval sees the new chunks, not only B's cached answer
    assert answer(ask(a, "What comes out of the vent of a volcano?"))[::2] == ("miss", ["volcano.txt"])


def test_the_embedded_store_keeps_cached_answers_across_a_restart(lm_run: Path, tmp_path: Path):
    state_dir = tmp_path / "state"
    args = ["--cache", "--state-dir", str(state_dir)]
    question = "What does the pass statement do?"
    with serving(lm_run, args, logs=tmp_path) as (first,):
        state, text, _ = answer(ask(first, question))
        assert state == "miss"
        assert answer(ask(first, "What does the yield statement do?"))[0] == "miss"
    assert "Application shutdown complete" in first.log.read_text()  # SIGTERM: a clean shutdown, no kill
    with serving(lm_run, args, logs=tmp_path) as (second,):
        assert answer(ask(second, question)) == ("hit", text, [])
        assert answer(ask(second, "What does the yield statement do?"))[0] == "hit"
        assert answer(ask(second, "What does the del statement do?"))[0] == "miss"
