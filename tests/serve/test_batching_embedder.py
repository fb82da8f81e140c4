"""The server's embedder: concurrent callers share forwards, recent texts are not embedded again."""

import threading

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")

from genforge.models.embeddings import Embedder  # noqa: E402
from genforge.serve.embeddings import BatchingEmbedder  # noqa: E402


class Counting:
    """The real embedder, with its forwards and texts counted."""

    def __init__(self, inner):
        self.inner, self.calls, self.texts = inner, 0, 0
        self.name, self.version, self.dim = inner.name, inner.version, inner.dim
        self.tokenizer, self.path, self.max_tokens = inner.tokenizer, inner.path, inner.max_tokens

    def embed(self, texts):
        self.calls += 1
        self.texts += len(texts)
        return self.inner.embed(texts)

    def count_tokens(self, texts):
        return self.inner.count_tokens(texts)


@pytest.fixture(scope="module")
def plain():
    return Embedder()


def test_concurrent_callers_get_their_own_rows_from_fewer_forwards(plain):
    inner = Counting(plain)
    batching = BatchingEmbedder(inner, window_s=0.05)
    texts = [[f"question number {i} about files", f"sentence {i} two"] for i in range(16)]
    got: dict[int, np.ndarray] = {}

    def call(i):
        got[i] = batching.embed(texts[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inner.calls < 16  # shared forwards
    for i in range(16):
        assert np.allclose(got[i], plain.embed(texts[i]), atol=1e-5)


def test_a_recent_text_is_not_embedded_again_and_order_is_kept(plain):
    inner = Counting(plain)
    batching = BatchingEmbedder(inner, window_s=0.0, memo=8)
    a = batching.embed(["alpha beta", "gamma"])
    calls = inner.calls
    b = batching.embed(["gamma", "alpha beta", "gamma"])
    assert inner.calls == calls
    assert np.allclose(b, a[[1, 0, 1]])
    for i in range(20):  # the memo is bounded: old texts are evicted and embedded again when needed
        batching.embed([f"filler {i}"])
    batching.embed(["alpha beta"])
    assert inner.calls > calls + 20 and len(batching._memo) <= 8
