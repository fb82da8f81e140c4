"""The semantic cache: answer a question asked before without running the model.

A cache key has two parts. The exact part (`cache_key`) is a sha256 over everything that changes the
answer besides the question itself: model name and version, system prompt, sampling parameters, the
RAG index and its version, and every earlier turn. Entries are only ever compared within one exact
key. The similar part is the current user turn: an identical text is a hit without embedding it;
otherwise it is embedded, the store's nearest entries under that key are scored, and the best one at
or above the threshold that the verification stage (`verify.py`) accepts is the hit.

Only the store's top `CANDIDATES` by cosine are scored, so the lexical rescue of a typo or a Chinese
rewording works when the stored question is among them (it is, unless the key holds many near
neighbours that the embedder ranks above it).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from genforge.common.errors import ConfigError, DataError
from genforge.common.store import CacheEntry, Store
from genforge.data.jsonl import read_records
from genforge.models.embeddings import Embedder
from genforge.serve.verify import Verifier, similarity

# Chosen on the dev split of benchmarks/data/cache_pairs.jsonl: with verification, 0.75 gave the most
# paraphrase hits (en 94%, zh 88%) at zero false hits; below it gains one pair and leans harder on the rules.
DEFAULT_THRESHOLD = 0.75
CANDIDATES = 5
PAIRS_FILE = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "cache_pairs.jsonl"


def _canonical(value: object) -> object:
    """JSON-stable form: 0 and 0.0 are one temperature; None is the same as leaving a field out."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise ConfigError(f"cache key: cannot hash a value of type {type(value).__name__} ({value!r}); "
                      "pass JSON values (str, number, bool, list, dict)")


def cache_key(model: str, model_version: str, system_prompt: str, sampling: dict, rag_index: str | None,
              rag_version: str | None, history: list[dict]) -> str:
    """The exact part of the key: any difference in any argument gives a different hex digest."""
    body = {"model": model, "model_version": model_version, "system": system_prompt,
            "sampling": sampling, "rag_index": rag_index, "rag_version": rag_version if rag_index else None,
            "history": history}
    text = json.dumps(_canonical(body), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_cacheable(request_params: dict, allow_sampled: bool, *, default_temperature: float = 1.0) -> tuple[bool, str]:
    """Whether a request may be answered from / stored in the cache, and why (for the bypass header)."""
    if request_params.get("cache") is False:
        return False, "the request opted out (\"cache\": false)"
    if request_params.get("seed") is not None:
        return True, "fixed seed"
    temperature = request_params.get("temperature")
    temperature = default_temperature if temperature is None else float(temperature)
    if temperature == 0:
        return True, "temperature 0"
    if allow_sampled:
        return True, "sampled, and the deployment caches sampled requests"
    return False, f"sampled request (temperature {temperature:g}, no seed): only deterministic requests are cached"


@dataclass
class CacheHit:
    entry: CacheEntry
    similarity: float       # 1.0 for an exact-text hit
    exact: bool
    reason: str


def decide(stored: str, prompt: str, cosine: float, threshold: float,
           verifier: Verifier | None) -> tuple[bool, float, str]:
    """Does `prompt` reuse the answer to `stored`? -> (accepted, similarity, reason). Cache and eval share it."""
    if verifier is None:
        sim = float(cosine)
        return sim >= threshold, sim, "cosine"
    sim = similarity(stored, prompt, cosine)
    if sim < threshold:
        return False, sim, f"similarity {sim:.3f} below {threshold}"
    ok, reason = verifier.same(stored, prompt, cosine)
    return ok, sim, reason


class SemanticCache:
    """Exact key + similar question -> a stored response. Thread-safe; counters for Prometheus."""

    def __init__(self, store: Store, embedder: Embedder, threshold: float = DEFAULT_THRESHOLD, verify: bool = True,
                 ttl_s: float | None = None, max_entries: int | None = 10_000):
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"cache threshold must be in (0, 1], got {threshold}", param="threshold")
        if ttl_s is not None and ttl_s <= 0:
            raise ConfigError(f"cache ttl_s must be > 0 seconds (or unset), got {ttl_s}", param="ttl_s")
        if max_entries is not None and max_entries < 1:
            raise ConfigError(f"cache max_entries must be >= 1 (or unset), got {max_entries}", param="max_entries")
        self.store, self.embedder, self.threshold = store, embedder, threshold
        self.verifier = Verifier() if verify else None
        self.ttl_s, self.max_entries = ttl_s, max_entries
        # Prune every ~10% of max_entries puts: the table overshoots by at most that, and a put costs
        # one INSERT, not a DELETE scan.
        self.prune_every = max(1, min(1000, (max_entries or 10_000) // 10))
        self.hits = self.misses = self.rejected = 0
        self._puts = 0
        self._lock = threading.Lock()
        # A miss's vector, kept for the put that follows it, so an answer is embedded once.
        self._pending: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def _expired(self, entry: CacheEntry, now: float) -> bool:
        return self.ttl_s is not None and entry.created < now - self.ttl_s

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def lookup(self, key: str, prompt: str) -> CacheHit | None:
        return self.lookup_exact(key, prompt) or self.lookup_near(key, prompt)

    def lookup_exact(self, key: str, prompt: str) -> CacheHit | None:
        """The same text under the same key: one indexed query, no embedding."""
        entry = self.store.cache_exact(key, prompt)
        if entry is not None and not self._expired(entry, time.time()):
            return self._hit(CacheHit(entry, 1.0, True, "same text"))
        return None

    def lookup_near(self, key: str, prompt: str) -> CacheHit | None:
        """The best verified near match under the same key (after `lookup_exact` found nothing)."""
        now = time.time()
        vector = self.embedder.embed([prompt])[0]
        best: CacheHit | None = None
        rejected = 0
        for cand, cosine in self.store.cache_nearest(key, vector, k=CANDIDATES):
            if self._expired(cand, now):
                continue
            ok, sim, reason = decide(cand.prompt, prompt, cosine, self.threshold, self.verifier)
            if ok and (best is None or sim > best.similarity):
                best = CacheHit(cand, sim, False, reason)
            # Counted only when similarity alone would have served it: what verification prevented.
            rejected += (not ok) and sim >= self.threshold
        if rejected:
            self._count("rejected", rejected)
        if best is not None:
            return self._hit(best)
        self._count("misses")
        with self._lock:
            self._pending[(key, prompt)] = vector
            while len(self._pending) > 256:
                self._pending.popitem(last=False)
        return None

    def _hit(self, hit: CacheHit) -> CacheHit:
        assert hit.entry.id is not None
        self.store.cache_touch(hit.entry.id)
        self._count("hits")
        return hit

    def put(self, key: str, prompt: str, response: dict, vector: np.ndarray | None = None) -> int:
        if vector is None:
            with self._lock:
                vector = self._pending.pop((key, prompt), None)
        if vector is None:
            vector = self.embedder.embed([prompt])[0]
        entry_id = self.store.cache_put(CacheEntry(key=key, prompt=prompt, vector=vector, response=response))
        with self._lock:
            self._puts += 1
            due = self._puts % self.prune_every == 0
        if due:
            self.store.cache_prune(max_entries=self.max_entries, ttl_s=self.ttl_s)
        return entry_id

    def invalidate(self, key: str | None = None) -> int:
        """Delete every entry, or every entry of one exact key; returns how many went."""
        with self._lock:
            self._pending.clear()
        return self.store.cache_delete(key)


def load_pairs(path: str | Path = PAIRS_FILE) -> list[dict]:
    rows = []
    for n, row in read_records(path, "the cache pair set (it ships as benchmarks/data/cache_pairs.jsonl)"):
        missing = {"a", "b", "same", "category", "lang", "split"} - set(row)
        if missing:
            raise DataError(f"{path}:{n}: pair lacks {sorted(missing)}")
        rows.append(row)
    return rows


def evaluate_pairs(path: str | Path, embedder: Embedder, thresholds: tuple[float, ...] = (0.80, 0.85, 0.90, 0.95),
                   verify: bool = True, split: str = "test") -> list[dict]:
    """Paraphrase-hit and false-hit rates per threshold and language (and "all") on one split.

    A pair is a hit when the cache, holding `a`, would answer `b` with it: the same `decide` as lookup.
    """
    rows = [r for r in load_pairs(path) if r["split"] == split]
    if not rows:
        raise DataError(f"{path} has no pairs in split {split!r}")
    va, vb = embedder.embed([r["a"] for r in rows]), embedder.embed([r["b"] for r in rows])
    cosines = (va * vb).sum(axis=1)
    verifier = Verifier() if verify else None
    out = []
    for t in thresholds:
        hits = [decide(r["a"], r["b"], float(c), t, verifier)[0] for r, c in zip(rows, cosines)]
        for lang in ("all", *sorted({r["lang"] for r in rows})):
            pos = [h for h, r in zip(hits, rows) if r["same"] and lang in ("all", r["lang"])]
            neg = [h for h, r in zip(hits, rows) if not r["same"] and lang in ("all", r["lang"])]
            out.append({"threshold": t, "verify": verify, "lang": lang, "split": split,
                        "paraphrases": len(pos), "near_misses": len(neg),
                        "hit_rate": sum(pos) / len(pos) if pos else math.nan,
                        "false_hit_rate": sum(neg) / len(neg) if neg else math.nan})
    return out
