"""The application layer's blocking steps, over one store and one embedder: the guard's input checks,
the semantic cache and retrieval. `AppLayer` (pipeline.py) calls them by name, either in a process
of their own (`LayerProcess`, the default) or in threads of the server's process (`LocalSteps`).

Why a process of their own: on 2 cores, the same steps at the same request rate in a second process
left a plain server's throughput where it was, while in the server's process they cost it 27%
(benchmarks/app_layer.py). The cost was not the CPU they use but the interpreter they share: the
embedding forward, the verifier and the store waited behind the decode loop and the event loop for
Python's lock (a step that took 2-7 ms alone took 60-170 ms at 16 clients), and every request waited
with them.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from genforge.common.errors import ConfigError, NotFoundError
from genforge.serve.app_config import AppConfig
from genforge.serve.embeddings import SharedEmbedder

WORKER_THREADS = 64  # mostly waiting (on the embedding batch, the store), so cheap


class LayerSteps:
    """The configured steps, built at start-up so a bad config fails before the port opens."""

    def __init__(self, config: AppConfig, state_dir: Path, embedder: SharedEmbedder | None = None):
        from genforge.common.store import open_store

        self.config = config
        self.store = self.guard = self.cache = self.retriever = None
        emb = (embedder or SharedEmbedder(config.embedder)).get()  # every step embeds: load it now
        self.info = {"embedder_version": emb.version}
        self._reported, self._lock = 0, threading.Lock()
        if config.needs_store:
            self.store = open_store(config.store or state_dir)
            self.info["store"] = self.store.url
        if config.guard.policy != "off":
            from genforge.serve.guard import Guard

            g = config.guard
            self.guard = Guard(g.policy, injection_threshold=g.injection_threshold, allowlist=g.allowlist,
                               banned=g.banned, embedder=emb)
        if config.cache.enabled:
            from genforge.serve.cache import SemanticCache

            c = config.cache
            self.cache = SemanticCache(self.store, emb, threshold=c.threshold, verify=c.verify, ttl_s=c.ttl_s,
                                       max_entries=c.max_entries)
        if config.rag.index is not None:
            from genforge.data.retriever import Retriever
            from genforge.models.embeddings import load_cross_encoder

            reranker = load_cross_encoder(config.rag.reranker) if config.rag.reranker else None
            try:
                self.retriever = Retriever(self.store, emb, config.rag.index, reranker=reranker)
            except NotFoundError as e:
                raise ConfigError(f"--rag {config.rag.index}: {e.message}", param="rag") from None

    # The guard (GuardResult in, GuardResult out: the placeholders travel inside it).
    def check_input(self, messages: Any, placeholders: Any = None, detector: bool = True) -> Any:
        return self.guard.check_input(messages, placeholders, detector=detector)

    def finish_input(self, result: Any) -> Any:
        return self.guard.finish_input(result)

    # The cache.
    def lookup(self, key: str, turn: str) -> tuple[Any, int]:
        """The hit (the same text, else a verified near match, or None) and the verification rejections
        not yet reported (a counter's increment)."""
        hit = self.cache.lookup(key, turn)
        with self._lock:
            new, self._reported = self.cache.rejected - self._reported, self.cache.rejected
        return hit, new

    def put(self, key: str, turn: str, stored: dict) -> int:
        return self.cache.put(key, turn, stored)

    def invalidate(self, key: str | None) -> int:
        return self.cache.invalidate(key)

    # Retrieval.
    def search(self, question: str, k: int, mode: str | None) -> list:
        return self.retriever.search(question, k, mode)

    def index_version(self, index: str) -> Any:
        return self.store.index_version(index)

    def chunk(self, chunk_id: str) -> Any:
        return self.retriever.chunk(chunk_id)

    def sources(self) -> dict[str, int]:
        return self.retriever.sources()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class LocalSteps:
    """`LayerSteps` in threads of the server's process (`own_process: false`): no second copy of the
    embedder, at the cost measured in the module doc."""

    def __init__(self, config: AppConfig, state_dir: Path, embedder: SharedEmbedder | None = None):
        self.steps = LayerSteps(config, state_dir, embedder)
        self.info = self.steps.info
        # Many threads: a request waiting for the shared embedding forward holds one while it waits
        # (asyncio's default 6 queued 16 concurrent requests before they could join the batch).
        self._pool = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="genforge-app")

    def wait_ready(self) -> dict:
        return self.info

    @property
    def alive(self) -> bool:
        return True

    async def call(self, method: str, *args: Any) -> Any:
        fn = functools.partial(getattr(self.steps, method), *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.steps.close()
