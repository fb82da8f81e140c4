"""Ranking chunks for a question: BM25 (bm25s), dense (over vectors the caller passes), hybrid by
reciprocal rank fusion, and an optional rerank by a cross-encoder-style scorer.

This layer never loads a model: dense search takes the embeddings the caller computed, and `rerank`
takes any callable that scores (question, passage) pairs, e.g. `CrossEncoder(folder).predict`.
A ranking is a list of (key, score), best first; keys are whatever identifies a chunk to the caller
(an index into a list, or a chunk id), so rankings from different places can be fused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np

from genforge.common.errors import ConfigError, DataError
from genforge.common.store import Chunk
from genforge.data.documents import embedding_text

MODES = ("dense", "bm25", "hybrid")
RRF_K = 60
# A cross-encoder reads every (question, passage) pair: rerank only the head of the fused ranking.
RERANK_CANDIDATES = 20
K = TypeVar("K", bound=Hashable)
Ranking = list[tuple[K, float]]
PairScorer = Callable[[list[tuple[str, str]]], Sequence[float]]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+")
_CJK_RUN = re.compile(rf"[{_CJK}]+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens; a CJK run (no spaces between words) becomes its character bigrams."""
    out: list[str] = []
    for tok in _TOKENS.findall(text.lower()):
        if _CJK_RUN.fullmatch(tok):
            out += [tok] if len(tok) == 1 else [tok[i:i + 2] for i in range(len(tok) - 1)]
        else:
            out.append(tok)
    return out


class BM25Index:
    """BM25 (Lucene variant, bm25s) over `texts`; `ranking` keys are positions in `texts`."""

    def __init__(self, texts: Sequence[str]):
        import bm25s

        self.size = len(texts)
        self._bm25 = bm25s.BM25()
        if self.size:
            self._bm25.index([tokenize(t) for t in texts], show_progress=False)

    def ranking(self, query: str, n: int) -> Ranking[int]:
        tokens = tokenize(query)
        if not self.size or not tokens:
            return []
        scores = self._bm25.get_scores(tokens)
        top = np.argsort(-scores, kind="stable")[:n]
        # A chunk sharing no term with the question is not a BM25 match at all.
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]


def dense_ranking(vectors: np.ndarray, query_vector: np.ndarray, n: int) -> Ranking[int]:
    """Cosine (dot product of unit vectors) of every row of `vectors` with `query_vector`, best first."""
    vectors = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(query_vector, dtype=np.float32).reshape(-1)
    if vectors.size == 0:
        return []
    if vectors.ndim != 2 or vectors.shape[1] != q.shape[0]:
        raise ConfigError(f"query vector of size {q.shape[0]} for chunk vectors of shape {vectors.shape}; "
                          "embed the question with the model the chunks were embedded with", param="vector")
    scores = vectors @ q
    top = np.argsort(-scores, kind="stable")[:n]
    return [(int(i), float(scores[i])) for i in top]


def fuse(rankings: Sequence[Ranking[K]], k: int = RRF_K) -> Ranking[K]:
    """Reciprocal rank fusion: score(key) = sum over rankings of 1 / (k + rank), rank from 1."""
    total: dict[K, float] = {}
    for ranking in rankings:
        for rank, (key, _) in enumerate(ranking, 1):
            total[key] = total.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(total.items(), key=lambda kv: -kv[1])


def rerank(question: str, candidates: list[tuple[Chunk, float]], scorer: PairScorer,
           k: int) -> list[tuple[Chunk, float]]:
    """Re-score `candidates` with `scorer` on (question, chunk text) pairs; the top `k` by that score."""
    if not candidates:
        return []
    scores = [float(s) for s in scorer([(question, embedding_text(c)) for c, _ in candidates])]
    if len(scores) != len(candidates):
        raise ConfigError(f"the reranker returned {len(scores)} scores for {len(candidates)} pairs",
                          param="reranker")
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    return [(candidates[i][0], scores[i]) for i in order[:k]]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown retrieval mode {mode!r} (choose one of: {', '.join(MODES)})", param="mode")
    return mode


def combine(mode: str, dense: Ranking[K] | None, bm25: Ranking[K] | None) -> Ranking[K]:
    """The ranking of `mode` from the dense and BM25 rankings (only the ones the mode needs)."""
    check_mode(mode)
    if mode == "dense":
        return list(dense or [])
    if mode == "bm25":
        return list(bm25 or [])
    return fuse([dense or [], bm25 or []])


def search(chunks: Sequence[Chunk], vectors: np.ndarray | None, question: str,
           query_vector: np.ndarray | None, *, k: int = 5, mode: str = "hybrid",
           bm25: BM25Index | None = None, reranker: PairScorer | None = None,
           depth: int = 50) -> list[tuple[Chunk, float]]:
    """The top `k` of `chunks` for `question`. `vectors[i]` embeds `chunks[i]` and `query_vector` the
    question (dense and hybrid); `bm25` is reused when given (build it once per chunk list);
    `depth` candidates per retriever are fused, and reranked when a `reranker` is set."""
    check_mode(mode)
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}", param="k")
    if not question.strip():
        raise DataError("the question is empty", param="question")
    depth = max(depth, k)
    dense = bm = None
    if mode != "bm25":
        if vectors is None or query_vector is None:
            raise ConfigError(f"mode {mode!r} needs the chunk vectors and the question's vector", param="mode")
        if len(vectors) != len(chunks):
            raise DataError(f"{len(vectors)} vectors for {len(chunks)} chunks; give one vector per chunk")
        dense = dense_ranking(vectors, query_vector, depth)
    if mode != "dense":
        bm = (bm25 or BM25Index([embedding_text(c) for c in chunks])).ranking(question, depth)
    ranked = [(chunks[i], s) for i, s in combine(mode, dense, bm)]
    if reranker is not None:
        return rerank(question, ranked[:max(k, RERANK_CANDIDATES)], reranker, k)
    return ranked[:k]
