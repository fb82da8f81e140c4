"""BM25, dense, hybrid (RRF) and rerank over chunks, with real embeddings of a small corpus."""

import numpy as np
import pytest

from genforge.common.errors import ConfigError, DataError
from genforge.common.store import Chunk
from genforge.data.documents import embedding_text
from genforge.data.retrieval import BM25Index, dense_ranking, fuse, rerank, search, tokenize
from genforge.models.embeddings import Embedder

TEXTS = [
    "The cat sat on the warm windowsill all afternoon.",
    "Error E4711 means the flux capacitor overheated; replace fuse F2.",
    "To reset your password, open settings and choose account recovery.",
    "Our office is closed on public holidays and weekends.",
    "Bananas are rich in potassium and make a good snack.",
    "检索增强生成会把相关文档片段放进提示词中。",
    "The train to Paris leaves from platform nine every hour.",
]


@pytest.fixture(scope="module")
def corpus():
    emb = Embedder()
    chunks = [Chunk(f"doc{i}.txt", 0, t, {"heading": None}, id=f"i:{i}") for i, t in enumerate(TEXTS)]
    return emb, chunks, emb.embed([embedding_text(c) for c in chunks])


def test_tokenize_words_and_cjk_bigrams():
    assert tokenize("Hello, World! e4711 snake_case") == ["hello", "world", "e4711", "snake_case"]
    assert tokenize("检索增强 RAG") == ["检索", "索增", "增强", "rag"]
    assert tokenize("猫") == ["猫"]


def test_bm25_finds_rare_terms_and_chinese(corpus):
    _, chunks, _ = corpus
    bm = BM25Index([embedding_text(c) for c in chunks])
    assert bm.ranking("what does e4711 mean", 3)[0][0] == 1
    assert bm.ranking("文档片段", 3)[0][0] == 5
    # Only chunks sharing a term are BM25 matches; no term at all -> nothing.
    assert [i for i, _ in bm.ranking("potassium", 10)] == [4]
    assert bm.ranking("zzzz qqqq", 5) == [] and bm.ranking("!!", 5) == []


def test_dense_finds_paraphrases_bm25_cannot(corpus):
    emb, chunks, vecs = corpus
    q = "I forgot my login credentials, how do I get back in?"
    top = dense_ranking(vecs, emb.embed([q])[0], 3)
    assert top[0][0] == 2 and top[0][1] > top[1][1]
    assert abs(top[0][1] - float(vecs[2] @ emb.embed([q])[0])) < 1e-5
    with pytest.raises(ConfigError, match="embed the question"):
        dense_ranking(vecs, np.ones(10, dtype=np.float32), 3)


def test_fuse_is_reciprocal_rank_fusion():
    fused = fuse([[("a", 9.0), ("b", 5.0)], [("b", 0.3), ("c", 0.1)]], k=60)
    assert [key for key, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61) and fused[2][1] == pytest.approx(1 / 62)


def test_search_modes(corpus):
    emb, chunks, vecs = corpus
    q = "train departure platform to Paris"
    qv = emb.embed([q])[0]
    for mode in ("dense", "bm25", "hybrid"):
        hits = search(chunks, vecs, q, qv, k=2, mode=mode)
        assert hits[0][0].id == "i:6" and len(hits) == 2
    # Hybrid keeps what either retriever is sure of: the error code (lexical) and the paraphrase (dense).
    q2 = "code E4711 problem; also I cannot remember how to sign in"
    hybrid = {c.id for c, _ in search(chunks, vecs, q2, emb.embed([q2])[0], k=3, mode="hybrid")}
    assert {"i:1", "i:2"} <= hybrid
    assert search(chunks, None, "bananas", None, k=1, mode="bm25")[0][0].id == "i:4"
    with pytest.raises(ConfigError, match="unknown retrieval mode 'fuzzy'"):
        search(chunks, vecs, q, qv, mode="fuzzy")
    with pytest.raises(ConfigError, match="needs the chunk vectors"):
        search(chunks, None, q, None, mode="dense")
    with pytest.raises(DataError, match="question is empty"):
        search(chunks, vecs, "  ", qv)


def overlap_scorer(pairs):
    """A real (if simple) pair scorer: the share of the question's words found in the passage."""
    out = []
    for q, p in pairs:
        qt, pt = set(tokenize(q)), set(tokenize(p))
        out.append(len(qt & pt) / max(len(qt), 1))
    return out


def test_rerank_hook_reorders_by_scorer(corpus):
    emb, chunks, vecs = corpus
    q = "office closed on public holidays"
    candidates = [(chunks[0], 0.9), (chunks[3], 0.5), (chunks[4], 0.4)]
    out = rerank(q, candidates, overlap_scorer, k=2)
    assert [c.id for c, _ in out] == ["i:3", "i:0"] and out[0][1] == pytest.approx(1.0)
    # Through search: the reranker decides the final order among the fused candidates.
    hits = search(chunks, vecs, q, emb.embed([q])[0], k=1, mode="hybrid", reranker=overlap_scorer)
    assert hits[0][0].id == "i:3" and hits[0][1] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="returned 1 scores for 3 pairs"):
        rerank(q, candidates, lambda pairs: [0.0], k=2)
