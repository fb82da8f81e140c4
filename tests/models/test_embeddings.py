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
