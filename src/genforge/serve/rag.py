"""Searching one document index in the request path (`genforge serve --rag NAME`), and for
`genforge rag query|eval`: dense through the store's `nearest`, BM25 over the index's chunks kept in
memory and rebuilt only when the index version changes, hybrid by reciprocal rank fusion, and an
optional cross-encoder rerank. The index is built by jobs/rag.py (`genforge rag ingest`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from genforge.common.errors import ConfigError, DataError, NotFoundError
from genforge.common.store import Chunk, Store
from genforge.data.documents import embedding_text
from genforge.data.retrieval import RERANK_CANDIDATES, BM25Index, PairScorer, check_mode, combine, rerank
from genforge.models.embeddings import Embedder


def embedder_id(embedder: Embedder) -> str:
    return f"{embedder.name}@{embedder.version}"


def load_cross_encoder(path: str | Path) -> PairScorer:
    """A sentence-transformers CrossEncoder from a local folder, as the `rerank` scorer."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"reranker folder {folder} does not exist or is not a cross-encoder model "
                          "(no config.json)", param="reranker")
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(folder), device="cpu", local_files_only=True)
    return lambda pairs: model.predict(pairs, show_progress_bar=False).tolist()


class Retriever:
    """Search one index of a store; thread-safe. BM25 is built from the index's chunks once per index
    version, so a request only pays for it right after the index changed."""

    def __init__(self, store: Store, embedder: Embedder, index: str, *, reranker: PairScorer | None = None,
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
