"""RAG jobs end to end on the real embedder and the embedded SQLite store: ingest every file type and
a pydoc subset, query, re-ingest, an interrupted ingest, evaluation, and the shipped question set."""

import importlib.util
import json
import re
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from genforge.common.errors import ConfigError, NotFoundError
from genforge.common.store import open_store
from genforge.data.retriever import Retriever
from genforge.jobs.rag import evaluate, ingest, query
from genforge.models.embeddings import Embedder, load_cross_encoder

# The hand-written PDF maker lives beside the readers' tests; tests/ is not a package, so load it by path.
_spec = importlib.util.spec_from_file_location("_docs_tests", Path(__file__).parents[1] / "data" / "test_documents.py")
_docs_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_docs_tests)
make_pdf = _docs_tests.make_pdf
QUESTIONS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "rag_pydoc_questions.jsonl"
TOPICS = ["assert", "lambda", "global", "shifting", "pass", "del", "yield", "while"]


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


@pytest.fixture
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    (d / "nested").mkdir(parents=True)
    (d / "plain.txt").write_text("The warehouse in Rotterdam ships orders every Tuesday morning.\n")
    (d / "guide.md").write_text("# Espresso guide\n\n## Grinding\n\nGrind the beans fine, like table salt, "
                                "for a nine bar extraction.\n")
    (d / "page.html").write_text("<h1>Parking</h1><p>Visitors park in lot C behind the gym.</p>"
                                 "<script>var tracking = 'lot Z';</script>")
    (d / "nested" / "faq.jsonl").write_text(json.dumps({"text": "Lost badges are replaced at reception for "
                                                                "a five euro fee."}) + "\n")
    make_pdf(d / "nested" / "report.pdf", [["Solar panel output fell during the winter storms."]])
    (d / "nested" / "broken.pdf").write_bytes(b"%PDF-1.7\nthis is not really a pdf")
    (d / "empty.md").write_text("")
    return d


def test_ingest_all_types_query_and_reingest(tmp_path, docs, embedder):
    store = str(tmp_path / "state")
    out = ingest([str(docs)] + [f"builtin:pydoc/{t}" for t in TOPICS], "kb", store, embedder=embedder,
                 chunk_tokens=120, overlap=20)
    failed = {Path(f["source"]).name: f["reason"] for f in out["failed"]}
    assert set(failed) == {"broken.pdf", "empty.md"}
    assert "cannot parse the PDF" in failed["broken.pdf"]
    assert out["sources"] == 7 + len(TOPICS) and out["ingested"] == 5 + len(TOPICS)
    assert out["index_chunks"] == out["chunks"] > len(TOPICS)

    # Hybrid (the default before any eval) fuses BM25, so each question shares a word with its target.
    expect = {"When does the warehouse send out parcels?": "plain.txt",
              "how fine should the beans be milled?": "guide.md",
              "where can visitors leave their car?": "page.html",
              "what does it cost to replace lost badges?": "faq.jsonl",
              "why did the solar production drop?": "report.pdf",
              "how do I write a small anonymous function in one expression?": "builtin:pydoc/lambda",
              "which operator moves the bits of an integer to the left?": "builtin:pydoc/shifting"}
    for question, source in expect.items():
        hits = query("kb", question, store, k=3, embedder=embedder)
        assert hits[0]["source"].endswith(source), (question, hits[0])
        assert set(hits[0]) == {"id", "source", "position", "heading", "score", "text"}
    # Dense alone finds paraphrases that share no word with the text.
    md = query("kb", "how fine should coffee be milled?", store, k=1, mode="dense", embedder=embedder)[0]
    assert md["heading"] == "Espresso guide > Grinding" and md["id"].startswith("kb:")
    assert "lot Z" not in json.dumps(query("kb", "lot", store, k=10, mode="bm25", embedder=embedder))

    # Nothing changed: every readable source is skipped by its digest.
    again = ingest([str(docs)], "kb", store, embedder=embedder, chunk_tokens=120, overlap=20)
    assert again["unchanged"] == 5 and again["ingested"] == 0 and again["index_chunks"] == out["index_chunks"]
    # A changed file replaces its chunks; a deleted one leaves the index.
    (docs / "plain.txt").write_text("The warehouse moved to Antwerp and ships on Fridays.\n")
    (docs / "page.html").unlink()
    changed = ingest([str(docs)], "kb", store, embedder=embedder, chunk_tokens=120, overlap=20)
    assert (changed["ingested"], changed["unchanged"], changed["removed"]) == (1, 3, 1)
    with open_store(store) as s:
        texts = {c.source: c.text for c in s.chunks("kb")}
    plain = texts[str((docs / "plain.txt").resolve())]
    assert "Antwerp" in plain and "Rotterdam" not in plain
    assert str((docs / "page.html").resolve()) not in texts


def test_interrupted_ingest_leaves_index_as_it_was(tmp_path, docs, embedder, monkeypatch):
    store = str(tmp_path / "state")
    ingest([str(docs), "builtin:pydoc/assert"], "kb", store, embedder=embedder)
    with open_store(store) as s:
        before = (s.index_version("kb"), [(c.id, c.text) for c in s.chunks("kb")])
    (docs / "plain.txt").write_text("Completely new text about submarines.\n")
    (docs / "guide.md").write_text("# Tea\n\nSteep green tea for two minutes.\n")
    calls = {"n": 0}
    real = embedder.embed

    def failing(texts):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-ingest")
        return real(texts)

    monkeypatch.setattr(embedder, "embed", failing)
    with pytest.raises(KeyboardInterrupt):
        # A batch of one chunk per flush, so the failure comes after a batch was handed to the writer.
        monkeypatch.setattr("genforge.data.ingest.EMBED_BATCH", 1)
        ingest([str(docs), "builtin:pydoc/lambda"], "kb", store, embedder=embedder)
    assert calls["n"] == 2
    with open_store(store) as s:
        assert (s.index_version("kb"), [(c.id, c.text) for c in s.chunks("kb")]) == before
    # A first ingest into a new index that fails leaves no empty index behind.
    calls["n"] = 1
    with pytest.raises(KeyboardInterrupt):
        ingest(["builtin:pydoc/pass"], "fresh", store, embedder=embedder)
    with open_store(store) as s:
        assert s.index_info("fresh") is None


def test_retriever_rebuilds_bm25_only_when_the_index_changes(tmp_path, embedder):
    store_dir = str(tmp_path / "state")
    ingest(["builtin:pydoc/assert", "builtin:pydoc/pass"], "kb", store_dir, embedder=embedder)
    with open_store(store_dir) as store:
        r = Retriever(store, embedder, "kb")
        state = r._state
        assert r.search("null operation placeholder body", 1, "bm25")[0][0].source == "builtin:pydoc/pass"
        assert r.refresh() is False and r._state is state      # unchanged: no rebuild on the request path
        ingest(["builtin:pydoc/lambda"], "kb", store_dir, embedder=embedder)
        hits = r.search("anonymous inline function expression", 1, "bm25")
        assert hits[0][0].source == "builtin:pydoc/lambda" and r._state is not state
        with pytest.raises(ConfigError, match="unknown retrieval mode"):
            r.search("x", 1, "semantic")
        # A configured reranker has the last word; its scores are the ones returned.
        def prefers_pass(pairs):
            return [1.0 if "pass" in passage else 0.0 for _, passage in pairs]
        reranked = Retriever(store, embedder, "kb", reranker=prefers_pass).search("anonymous function", 2)
        assert reranked[0][0].source == "builtin:pydoc/pass" and reranked[0][1] == 1.0
    with pytest.raises(ConfigError, match="reranker folder .* does not exist"):
        load_cross_encoder(tmp_path / "no-model")
    with pytest.raises(NotFoundError, match=r"unknown index 'nope'.*known: kb"):
        query("nope", "anything", store_dir, embedder=embedder)


def test_evaluate_reports_metrics_and_sets_default_mode(tmp_path, embedder, capsys):
    store = str(tmp_path / "state")
    ingest([f"builtin:pydoc/{t}" for t in TOPICS], "kb", store, embedder=embedder)
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines()]
    subset = [r for r in rows if r["topic"] in TOPICS]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(r) + "\n" for r in subset))
    result = evaluate("kb", str(qfile), store, embedder=embedder)
    assert result["questions"] == len(subset) >= 6
    assert set(result["modes"]) == {"dense", "bm25", "hybrid"}
    for m in result["modes"].values():
        assert set(m) == {"hit@1", "hit@3", "hit@5", "mrr", "ndcg@5"}
        assert 0 <= m["hit@1"] <= m["hit@3"] <= m["hit@5"] <= 1 and m["ndcg@5"] <= m["hit@5"]
    best = result["default_mode"]
    assert result["modes"][best]["hit@5"] >= 0.8       # on 8 distinct topics this is easy
    err = capsys.readouterr().err
    assert "| mode | hit@1 | hit@3 | hit@5 | mrr | ndcg@5 |" in err and f"{best} (default)" in err
    with open_store(store) as s:
        assert s.index_info("kb")["meta"]["default_mode"] == best
        assert Retriever(s, embedder, "kb").default_mode == best


def test_question_set_is_valid():
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 100
    assert len({r["topic"] for r in rows}) == len(topics)     # every pydoc topic has a question
    for r in rows:
        assert r["topic"] in topics, r
        assert not re.search(rf"(?<![\w-]){re.escape(r['topic'])}(?![\w-])", r["question"], re.I), r
        # Nor the title's words: the question must be answerable without echoing the heading.
        title = topics[r["topic"]].split("\n")[0]
        words = {w.lower() for w in re.findall(r"[A-Za-z]{4,}", title)} - {"statement", "statements", "python"}
        assert not any(re.search(rf"\b{w}\b", r["question"], re.I) for w in words), (r, title)
