"""Searching one document index of a store, and putting what it found into a prompt.

`Retriever` is the search that `genforge serve --rag NAME` runs in the request path, that
`genforge rag query|eval` run, and that `genforge eval --suite ... --rag NAME` runs to answer a
suite the way the server would: dense through the store's `nearest`, BM25 over the index's chunks
kept in memory and rebuilt only when the index version changes, hybrid by reciprocal rank fusion,
and an optional rerank. The index is written by data/ingest.py (`genforge rag ingest`, and files
uploaded to a server).

This layer loads no model: the caller passes the embedder (anything with `embed(texts)`, `name`
and `version`, e.g. models.embeddings.Embedder) and the rerank scorer.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from genforge.common.errors import ConfigError, DataError, NotFoundError
from genforge.common.store import Chunk, Store
from genforge.data.documents import embedding_text
from genforge.data.retrieval import RERANK_CANDIDATES, BM25Index, PairScorer, check_mode, combine, rerank

# The retrieved sources go into the last user turn (any chat template accepts that; not all take a
# second system message), numbered so the answer can cite them.
RAG_TEMPLATE = ("Answer from the numbered sources and cite them as [1], [2]; if they do not hold the answer, "
                "say so.\n\n{sources}\n\nQuestion: {question}")
RAG_SOURCE_CHARS = 1500  # per source in the prompt: a small model's context is short
# A chunk of another source counts as evidence for a target only when it is at least this long:
# a stray "Added in version 3.10." is no evidence.
MIN_EVIDENCE_CHARS = 100


class TextEmbedder(Protocol):
    name: str
    version: str

    def embed(self, texts: list[str] | str) -> np.ndarray: ...


def embedder_id(embedder: TextEmbedder) -> str:
    return f"{embedder.name}@{embedder.version}"


class Retriever:
    """Search one index of a store; thread-safe. BM25 is built from the index's chunks once per index
    version, so a request only pays for it right after the index changed."""

    def __init__(self, store: Store, embedder: TextEmbedder, index: str, *, reranker: PairScorer | None = None,
                 depth: int = 50):
        self.store, self.embedder, self.index = store, embedder, index
        self.reranker, self.depth = reranker, depth
        self._lock = threading.Lock()
        # (version, chunks by id, ids in BM25 order, BM25) replaced as one, so a search running while
        # another thread refreshes never pairs one version's ids with another's BM25.
        self._state: tuple[str | None, dict[str, Chunk], list[str], BM25Index | None] = (None, {}, [], None)
        self.default_mode = "hybrid"
        info = store.index_info(index)
        if info is None:
            raise NotFoundError(f"unknown index {index!r} (known: {', '.join(store.indexes()) or 'none'}; "
                                "create it with `genforge rag ingest PATHS --index NAME`)", param="index")
        if info["embedder"] != embedder_id(embedder):
            raise ConfigError(f"index {index!r} was embedded with {info['embedder']}, not "
                              f"{embedder_id(embedder)}; query it with the same model", param="embedder")
        self.refresh()

    def refresh(self) -> bool:
        """Rebuild the BM25 index if the store's index changed since the last build; True if rebuilt."""
        version = self.store.index_version(self.index)
        if version == self._state[0]:
            return False
        with self._lock:
            if version == self._state[0]:
                return False
            chunks = self.store.chunks(self.index)
            info = self.store.index_info(self.index) or {}
            bm25 = BM25Index([embedding_text(c) for c in chunks])
            self.default_mode = (info.get("meta") or {}).get("default_mode") or "hybrid"
            self._state = (version, {c.id: c for c in chunks}, [c.id for c in chunks], bm25)
            return True

    def chunks(self) -> list[Chunk]:
        """The index's chunks as of the last refresh, ordered by (source, position)."""
        return list(self._state[1].values())

    def chunk(self, chunk_id: str) -> Chunk | None:
        """The chunk with this id in the index as it is now (None when there is none)."""
        self.refresh()
        return self._state[1].get(chunk_id)

    def sources(self) -> dict[str, int]:
        """Each source of the index as it is now, with its number of chunks, in (source) order."""
        self.refresh()
        counts: dict[str, int] = {}
        for c in self._state[1].values():
            counts[c.source] = counts.get(c.source, 0) + 1
        return counts

    def search(self, question: str, k: int = 5, mode: str | None = None,
               vector: np.ndarray | None = None) -> list[tuple[Chunk, float]]:
        """The top `k` chunks for `question` by `mode` (None: the index's measured default)."""
        if not question or not question.strip():
            raise DataError("the question is empty", param="question")
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}", param="k")
        self.refresh()
        mode = check_mode(mode or self.default_mode)
        depth = max(self.depth, k)
        _, by_id, ids, index = self._state
        found: dict[str, Chunk] = {}
        dense = bm25 = None
        if mode != "bm25":
            v = self.embedder.embed([question])[0] if vector is None else vector
            # The store may be a version ahead of the BM25 state: its chunks are used as returned.
            hits = self.store.nearest(self.index, v, depth)
            found = {c.id: c for c, _ in hits}
            dense = [(c.id, s) for c, s in hits]
        if mode != "dense":
            bm25 = [(ids[i], s) for i, s in index.ranking(question, depth)]
        ranked = [(found.get(key) or by_id[key], score) for key, score in combine(mode, dense, bm25)]
        if self.reranker is not None:
            return rerank(question, ranked[:max(k, RERANK_CANDIDATES)], self.reranker, k)
        return ranked[:k]


# ---------------------------------------------------------------- the prompt


def source_label(source: str) -> str:
    """A file's name, not its path, in the prompt (the response's `sources` carry the full one)."""
    return source if source.startswith("builtin:") or "://" in source else Path(source).name


def source_block(number: int, chunk: Chunk) -> str:
    """One numbered source as the prompt shows it, cut at RAG_SOURCE_CHARS."""
    text = chunk.text if len(chunk.text) <= RAG_SOURCE_CHARS else chunk.text[:RAG_SOURCE_CHARS] + " ..."
    return f"[{number}] ({source_label(chunk.source)}) {text}"


def with_sources(messages: list[dict[str, Any]], last: int, question: str, chunks: list[Chunk]) -> list[dict]:
    """`messages` with user turn `last` replaced by `question` and the numbered `chunks` (a copy)."""
    out = [dict(m) for m in messages]
    blocks = "\n\n".join(source_block(i, c) for i, c in enumerate(chunks, 1))
    out[last]["content"] = RAG_TEMPLATE.format(sources=blocks, question=question)
    return out


# ---------------------------------------------------------------- what counts as a hit


def source_texts(chunks: list[Chunk]) -> dict[str, str]:
    """Each source's text rebuilt from its chunks (placed at their offsets), whitespace collapsed."""
    by_source: dict[str, list[Chunk]] = {}
    for c in chunks:
        by_source.setdefault(c.source, []).append(c)
    return {source: _normalised_text(cs) for source, cs in by_source.items()}


def _normalised_text(chunks: list[Chunk]) -> str:
    end = max(c.metadata.get("end", 0) for c in chunks)
    if not end:
        return " ".join(" ".join(c.text.split()) for c in chunks)
    buf = [" "] * end
    for c in chunks:
        start = c.metadata["start"]
        buf[start:start + len(c.text)] = c.text
    return " ".join("".join(buf).split())


def is_relevant(chunk: Chunk, target: str, texts: dict[str, str]) -> bool:
    """Whether `chunk` is evidence for a question whose answer is in source `target`: a chunk of
    that source, or a long enough passage of another whose text appears verbatim in the target
    (pydoc repeats sections: "compound" holds "while"; "if" and "else" are one text)."""
    if chunk.source == target:
        return True
    text = " ".join(chunk.text.split())
    return len(text) >= MIN_EVIDENCE_CHARS and text in texts.get(target, "")
