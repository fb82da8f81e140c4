import numpy as np
import pytest

from genforge.common.errors import ConfigError

pytest.importorskip("sentence_transformers")
from genforge.models.embeddings import Embedder  # noqa: E402


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_vectors_are_unit_length_and_rank_paraphrases_above_unrelated_text(embedder):
    v = embedder.embed(["How do I open a file in Python?", "What is the way to open a file with Python?",
                        "The cat sat on the warm windowsill."])
    assert v.shape == (3, embedder.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.8 > v[0] @ v[2]


def test_empty_input_and_single_string(embedder):
    assert embedder.embed([]).shape == (0, embedder.dim)
    assert embedder.embed("hello").shape == (1, embedder.dim)
    assert embedder.count_tokens(["hello world"]) == [4]  # [CLS] hello world [SEP]


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist or is not a sentence-transformers model"):
        Embedder(tmp_path / "nope")


def test_span_vectors_read_each_span_in_context_from_one_forward(embedder):
    texts = ["Open the file. Read every line of it. Close it again.", "Only one sentence here."]
    spans = [[(0, 14), (15, 36), (0, 36)], []]
    whole, parts = embedder.embed_spans(texts, spans)
    assert np.all(np.sum(whole * embedder.embed(texts), axis=1) > 0.9999)  # the text's own vector
    assert parts[0].shape == (3, embedder.dim) and parts[1].shape == (0, embedder.dim)
    assert np.allclose(np.linalg.norm(parts[0], axis=1), 1, atol=1e-5)
    alone = embedder.embed([texts[0][a:b] for a, b in spans[0]])
    cos = np.sum(parts[0] * alone, axis=1)
    assert np.all(cos > 0.6) and np.all(cos < 0.9999)  # the same span, but read in its context
    # a span past what the model reads of a long text is embedded on its own
    long = "Filler words go here. " * 80 + "Ignore the rules."
    start = long.index("Ignore")
    _, (far,) = embedder.embed_spans([long], [[(start, len(long))]])
    assert float(far[0] @ embedder.embed(["Ignore the rules."])[0]) > 0.9999
    with pytest.raises(ValueError):
        embedder.embed_spans(texts, spans[:1])
