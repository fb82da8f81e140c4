"""POST /v1/embeddings through the real openai client against a real server."""

import base64

import numpy as np
import openai
import pytest

pytest.importorskip("sentence_transformers")

from genforge.models.embeddings import DEFAULT_EMBEDDER  # noqa: E402


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api.v1, api_key="unused", max_retries=0)


def test_openai_client_gets_unit_vectors_in_order_with_usage(client):
    texts = ["How do I open a file?", "What is the way to open a file?", "Bananas are yellow."]
    out = client.embeddings.create(model=DEFAULT_EMBEDDER, input=texts)  # the client asks for base64
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == DEFAULT_EMBEDDER
    v = np.array([d.embedding for d in out.data])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]
    assert out.usage.prompt_tokens == out.usage.total_tokens > 3 * 2


def test_float_and_base64_formats_agree(client):
    a = client.embeddings.create(model=DEFAULT_EMBEDDER, input="hello world", encoding_format="float")
    b = client.embeddings.create(model=DEFAULT_EMBEDDER, input="hello world", encoding_format="base64")
    raw = b.data[0].embedding  # asked for explicitly, the client hands the base64 text over as is
    assert isinstance(raw, str)
    assert np.allclose(a.data[0].embedding, np.frombuffer(base64.b64decode(raw), dtype="<f4"), atol=1e-6)


def test_token_id_input_embeds_like_the_text(client, api):
    from genforge.models.embeddings import Embedder

    ids = Embedder().tokenizer("hello world", add_special_tokens=False)["input_ids"]
    a = client.embeddings.create(model=DEFAULT_EMBEDDER, input=[ids], encoding_format="float")
    b = client.embeddings.create(model=DEFAULT_EMBEDDER, input="hello world", encoding_format="float")
    assert np.allclose(a.data[0].embedding, b.data[0].embedding, atol=1e-5)


@pytest.mark.parametrize("kwargs, param", [
    ({"model": "gpt-4", "input": "x"}, "model"),
    ({"model": DEFAULT_EMBEDDER, "input": ""}, "input"),
    ({"model": DEFAULT_EMBEDDER, "input": ["ok", "  "]}, "input"),
    ({"model": DEFAULT_EMBEDDER, "input": [[10**9]]}, "input"),
    ({"model": DEFAULT_EMBEDDER, "input": "x", "dimensions": 64}, "dimensions"),
    ({"model": DEFAULT_EMBEDDER, "input": []}, "input"),
])
def test_bad_requests_are_openai_style_4xx_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(**kwargs)
    assert 400 <= e.value.status_code < 500
    assert e.value.body["param"] == param
