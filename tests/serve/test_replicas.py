"""`genforge serve` as real processes sharing one store: two replicas on one PostgreSQL + pgvector
database share the semantic cache and the document index, and the embedded store survives a restart.

    genforge rag ingest DOCS --index docs --store postgresql://...      (a subprocess)
    genforge serve MODEL --cache --rag docs --store postgresql://...    (twice, on two ports)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .processes import answer, ask, genforge, serving

pytest.importorskip("sentence_transformers")

pytestmark = pytest.mark.slow

ZEBRA = "Every zebra has a stripe pattern of its own, like a fingerprint: no two zebras share one.\n"
VOLCANO = "Volcanoes erupt when magma rises through cracks in the crust and lava pours out of the vent.\n"


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
