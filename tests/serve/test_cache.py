"""The semantic cache over a real store (SQLite, and PostgreSQL + pgvector) and the real embedder."""

from __future__ import annotations

import time

import numpy as np
import pytest

from genforge.common.errors import ConfigError
from genforge.common.store import open_store
from genforge.models.embeddings import Embedder
from genforge.serve.cache import PAIRS_FILE, SemanticCache, cache_key, evaluate_pairs, is_cacheable


class CountingEmbedder:
    """The real embedder, counting its calls (to prove the exact-text short-cut never embeds)."""

    def __init__(self, inner: Embedder):
        self.inner, self.calls = inner, 0

    def embed(self, texts):
        self.calls += 1
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(tmp_path / "state")
    else:
        s = open_store(request.getfixturevalue("pg_store_url"))
    yield s
    s.close()


def make(store, embedder, **kw) -> tuple[SemanticCache, CountingEmbedder]:
    counting = CountingEmbedder(embedder)
    return SemanticCache(store, counting, **kw), counting


KEY = cache_key("nano", "v1", "You are helpful.", {"temperature": 0}, None, None, [])


def test_paraphrases_hit_and_near_misses_of_each_category_miss(store, embedder):
    cache, _ = make(store, embedder)
    stored = {
        "What is the capital of France?": "What is the capital of Germany?",            # entity
        "How do I cook rice for 2 people?": "How do I cook rice for 6 people?",          # number
        "Which foods are safe for dogs to eat?": "Which foods are not safe for dogs to eat?",  # negation
        "How do I get from London to Paris?": "How do I get from Paris to London?",      # direction
        "How many grams are in a pound?": "How many grams are in an ounce?",             # unit
        "What is on my calendar today?": "What is on my calendar tomorrow?",             # time
        "Which planet is the biggest?": "Which planet is the smallest?",                 # comparative
        "法国的首都是哪里？": "德国的首都是哪里？",                                          # zh entity
        "北京到上海的机票多少钱？": "上海到北京的机票多少钱？",                                # zh direction
    }
    for i, q in enumerate(stored):
        cache.put(KEY, q, {"answer": i})
    for near in stored.values():
        assert cache.lookup(KEY, near) is None, near
    assert cache.rejected >= len(stored) - 2  # most were above the threshold: the verifier refused them
    for q, para in [("What is the capital of France?", "Which city is the capital of France?"),
                    ("How do I cook rice for 2 people?", "how do i cook rice for 2 peopel"),
                    ("法国的首都是哪里？", "法国首都是哪个城市？")]:
        hit = cache.lookup(KEY, para)
        assert hit is not None and not hit.exact, para
        assert hit.entry.prompt == q and hit.similarity >= cache.threshold


def test_different_exact_keys_never_share(store, embedder):
    cache, _ = make(store, embedder)
    cache.put(KEY, "What is the capital of France?", {"answer": "Paris"})
    others = [cache_key("nano", "v2", "You are helpful.", {"temperature": 0}, None, None, []),
              cache_key("nano", "v1", "You are terse.", {"temperature": 0}, None, None, []),
              cache_key("nano", "v1", "You are helpful.", {"temperature": 0, "max_tokens": 5}, None, None, []),
              cache_key("nano", "v1", "You are helpful.", {"temperature": 0}, "docs", "7", []),
              cache_key("nano", "v1", "You are helpful.", {"temperature": 0}, None, None,
                        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])]
    assert len(set(others) | {KEY}) == 6
    for k in others:
        assert cache.lookup(k, "What is the capital of France?") is None
    assert cache.lookup(KEY, "What is the capital of France?").exact
    # canonical: 0 and 0.0 are one temperature, None is an absent field
    assert KEY == cache_key("nano", "v1", "You are helpful.", {"temperature": 0.0, "seed": None}, None, None, [])


def test_exact_text_does_not_embed_and_a_put_after_a_miss_reuses_its_vector(store, embedder):
    cache, counting = make(store, embedder)
    assert cache.lookup(KEY, "Why is the sky blue?") is None
    assert counting.calls == 1
    cache.put(KEY, "Why is the sky blue?", {"answer": "Rayleigh"})
    assert counting.calls == 1  # the miss's vector was kept for this put
    hit = cache.lookup(KEY, "Why is the sky blue?")
    assert hit.exact and hit.similarity == 1.0 and hit.entry.response == {"answer": "Rayleigh"}
    assert counting.calls == 1
    assert (cache.hits, cache.misses, cache.rejected) == (1, 1, 0)


def test_ttl_expiry(store, embedder):
    cache, _ = make(store, embedder, ttl_s=0.5)
    cache.put(KEY, "What is photosynthesis?", {"answer": 1})
    assert cache.lookup(KEY, "What is photosynthesis?") is not None
    time.sleep(0.6)
    assert cache.lookup(KEY, "What is photosynthesis?") is None       # expired, though not yet pruned
    assert cache.lookup(KEY, "Can you explain photosynthesis?") is None
    cache.prune_every = 1
    cache.put(KEY, "What is a black hole?", {"answer": 2})
    assert store.cache_count() == 1                                    # the put pruned the expired one


def test_lru_eviction_at_max_size(store, embedder):
    cache, _ = make(store, embedder, max_entries=3)
    qs = ["What is the speed of light?", "Who wrote Hamlet?", "How do I center a div in CSS?"]
    for q in qs:
        cache.put(KEY, q, {"q": q})
    time.sleep(0.01)
    assert cache.lookup(KEY, qs[0]) is not None                          # now the most recently used
    cache.put(KEY, "What causes earthquakes?", {"q": 4})
    assert store.cache_count() == 3
    assert cache.lookup(KEY, qs[1]) is None                              # least recently used: evicted
    assert cache.lookup(KEY, qs[0]) is not None and cache.lookup(KEY, qs[2]) is not None


def test_pruning_is_amortised(store, embedder):
    cache, _ = make(store, embedder, max_entries=20)
    assert cache.prune_every == 2
    v = embedder.embed(["filler"])[0]
    for i in range(21):
        cache.put(KEY, f"question {i}", {"i": i}, vector=v)
    assert store.cache_count() == 21                                     # 21st put is not a pruning one
    cache.put(KEY, "question 21", {"i": 21}, vector=v)
    assert store.cache_count() == 20


def test_invalidate_all_and_by_key(store, embedder):
    cache, _ = make(store, embedder)
    other = cache_key("nano", "v2", "", {}, None, None, [])
    cache.put(KEY, "What is the speed of light?", {"a": 1})
    cache.put(KEY, "Who wrote Hamlet?", {"a": 2})
    cache.put(other, "Who wrote Hamlet?", {"a": 3})
    assert cache.invalidate(KEY) == 2
    assert cache.lookup(KEY, "Who wrote Hamlet?") is None
    assert cache.lookup(other, "Who wrote Hamlet?").entry.response == {"a": 3}
    assert cache.invalidate() == 1 and store.cache_count() == 0


def test_verification_off_serves_near_misses(tmp_path, embedder):
    """Why the stage exists: by cosine alone (0.99 here), both directions share an answer."""
    with open_store(tmp_path / "s") as store:
        cache, _ = make(store, embedder, threshold=0.85, verify=False)
        cache.put(KEY, "How do I get from London to Paris?", {"answer": "Eurostar from St Pancras"})
        hit = cache.lookup(KEY, "How do I get from Paris to London?")
        assert hit is not None and hit.entry.response == {"answer": "Eurostar from St Pancras"}


def test_is_cacheable():
    assert is_cacheable({"temperature": 0}, False) == (True, "temperature 0")
    assert is_cacheable({"temperature": 0.7, "seed": 3}, False)[0]
    ok, why = is_cacheable({"temperature": 0.7}, False)
    assert not ok and "temperature 0.7" in why
    assert not is_cacheable({}, False)[0]                               # default temperature 1
    assert is_cacheable({"temperature": 0.7}, True)[0]
    ok, why = is_cacheable({"temperature": 0, "cache": False}, True)
    assert not ok and "opted out" in why


def test_bad_settings_are_config_errors(tmp_path, embedder):
    with open_store(tmp_path / "s") as store:
        for kw in ({"threshold": 1.5}, {"ttl_s": 0}, {"max_entries": 0}):
            with pytest.raises(ConfigError):
                SemanticCache(store, embedder, **kw)
    with pytest.raises(ConfigError, match="cannot hash"):
        cache_key("m", "v", "", {"x": np.float32(1)}, None, None, [])


def test_evaluate_pairs_meets_the_target_on_the_test_split(embedder):
    rows = evaluate_pairs(PAIRS_FILE, embedder, thresholds=(0.75, 0.9), verify=True)
    best = next(r for r in rows if r["threshold"] == 0.75 and r["lang"] == "all")
    assert best["paraphrases"] > 50 and best["near_misses"] > 50
    assert best["hit_rate"] >= 0.85 and best["false_hit_rate"] <= 0.02
    plain = evaluate_pairs(PAIRS_FILE, embedder, thresholds=(0.75,), verify=False)
    assert next(r for r in plain if r["lang"] == "all")["false_hit_rate"] > 0.5
