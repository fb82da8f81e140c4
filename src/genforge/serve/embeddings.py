"""POST /v1/embeddings in the OpenAI format, and the one embedder the application layer shares.

The embedder (models/embeddings.py) is loaded once per server: at start-up when the cache, RAG
or the guard needs it, otherwise on the first /v1/embeddings request, so a server that never
embeds pays neither its start-up time nor its memory. Encoding runs in a worker thread: the event
loop keeps streaming other requests' tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import threading
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter

from genforge.common.errors import GenforgeError, NotFoundError
from genforge.serve.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage


class BatchingEmbedder:
    """The server's embedder: concurrent callers share one forward, and recent texts are remembered.

    Every request with a guard or cache on embeds its turn (the guard reads its sentences in context
    with `embed_spans`, the cache embeds the whole turn: one forward gives both). Unbatched, 16
    concurrent requests ran 16 small forwards at once on two cores: measured ~170 ms for one embed
    under load against ~23 ms per text in a batch of 16. So the first caller to arrive waits
    `window_s` for others, embeds everyone's texts in one forward and hands each its rows; a text seen
    recently (the guard's turn that is also the cache's) is not embedded again. Same interface as
    models.embeddings.Embedder."""

    def __init__(self, embedder: Any, *, window_s: float = 0.003, memo: int = 8192):
        self._inner = embedder
        self.name, self.version, self.dim = embedder.name, embedder.version, embedder.dim
        self.tokenizer, self.path, self.max_tokens = embedder.tokenizer, embedder.path, embedder.max_tokens
        self.window_s = window_s
        # text -> its vector, and (text, start, end) -> a span's vector in that text
        self._memo: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
        self._memo_size = memo
        self._cond = threading.Condition()
        self._pending: dict[str, set[tuple[int, int]]] = {}  # text -> the spans wanted of it
        self._leader = False
        self.forwards = 0  # batched forwards run (for tests and benchmarks)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self._inner.count_tokens(texts)

    def embed(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_spans(list(texts), [[] for _ in texts])[0]

    def embed_spans(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """As models.embeddings.Embedder.embed_spans, batched with the other callers of this moment."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        wanted = {t: set() for t in texts}
        for t, ss in zip(texts, spans):
            wanted[t].update(map(tuple, ss))
        keys = [k for t, ss in wanted.items() for k in (t, *((t, a, b) for a, b in ss))]
        with self._cond:
            self._queue(wanted)  # a forward under way takes no more texts; the next leader's will
            while any(k not in self._memo for k in keys):
                if self._leader:
                    self._cond.wait()
                else:  # (re)queue what is still missing: also what was evicted before this caller woke up
                    self._queue(wanted)
                    self._run_batch()
            whole = np.stack([self._memo[t] for t in texts])
            parts = [np.stack([self._memo[(t, a, b)] for a, b in ss]) if ss else np.zeros((0, self.dim), np.float32)
                     for t, ss in zip(texts, spans)]
            for k in keys:
                self._memo.move_to_end(k)
        return whole, parts

    def _queue(self, wanted: dict[str, set[tuple[int, int]]]) -> None:
        for t, ss in wanted.items():
            missing = {sp for sp in ss if (t, *sp) not in self._memo}
            if missing or t not in self._memo:
                self._pending.setdefault(t, set()).update(missing)

    def _run_batch(self) -> None:
        """Called holding the lock: lead one forward over every pending text."""
        self._leader = True
        try:
            self._cond.wait(self.window_s)  # let the other requests of this moment join
            self._cond.release()
            try:
                self._forward_pending()
            finally:
                self._cond.acquire()
        finally:
            self._leader = False
            self._cond.notify_all()

    def _forward_pending(self) -> None:
        """One forward over what is pending when it starts."""
        with self._cond:
            batch, self._pending = self._pending, {}
        texts, spans = list(batch), [sorted(ss) for ss in batch.values()]
        whole, parts = self._inner.embed_spans(texts, spans) if texts else (None, [])
        with self._cond:
            self.forwards += 1
            for i, t in enumerate(texts):
                self._memo[t] = whole[i]
                self._memo.move_to_end(t)
                for (a, b), v in zip(spans[i], parts[i]):
                    self._memo[(t, a, b)] = v
                    self._memo.move_to_end((t, a, b))
            new = len(texts) + sum(map(len, spans))
            while len(self._memo) > max(self._memo_size, new):
                self._memo.popitem(last=False)


class SharedEmbedder:
    """Loads the embedder once, on first use (thread-safe), for every step that needs it."""

    def __init__(self, path: str | Path | None = None):
        self.path = path
        self._embedder: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    from genforge.models.embeddings import Embedder

                    self._embedder = BatchingEmbedder(Embedder(self.path))
        return self._embedder

    @property
    def loaded(self) -> bool:
        return self._embedder is not None


def _texts(req: EmbeddingRequest, tokenizer: Any) -> list[str]:
    raw = req.input
    if isinstance(raw, str):
        items: list = [raw]
    elif raw and isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    texts = []
    for i, item in enumerate(items):
        where = "input" if len(items) == 1 else f"input[{i}]"
        if isinstance(item, list):  # token ids of the embedding model's own vocabulary
            vocab = tokenizer.vocab_size
            if not item or any(t < 0 or t >= vocab for t in item):
                raise GenforgeError(f"{where}: token ids must be a non-empty list of ids in [0, {vocab})",
                                    param="input")
            item = tokenizer.decode(item, skip_special_tokens=True)
        if not item.strip():
            raise GenforgeError(f"{where}: is empty; give text to embed", param="input")
        texts.append(item)
    return texts


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # what the openai client asks for by default: raw little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def embeddings_router(shared: SharedEmbedder) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> EmbeddingResponse:
        embedder = await asyncio.to_thread(shared.get)
        if req.model is not None and req.model != embedder.name:
            raise NotFoundError(f"model '{req.model}' does not exist for embeddings; this server embeds with "
                                f"'{embedder.name}'", param="model", code="model_not_found")
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise GenforgeError(f"dimensions: {embedder.name} gives {embedder.dim}-dimensional vectors and "
                                f"cannot shorten them; leave dimensions out", param="dimensions")
        texts = _texts(req, embedder.tokenizer)
        vectors = await asyncio.to_thread(embedder.embed, texts)
        tokens = sum(await asyncio.to_thread(embedder.count_tokens, texts))
        data = [EmbeddingData(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
        return EmbeddingResponse(data=data, model=embedder.name,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    return router
