"""A watermarking deployment end to end: `genforge serve --watermark` as a real process, the real `openai`
client, and `POST /v1/detect` on what it answered (serve/labelling.py, serve/detect.py)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from genforge.models.watermark import TextWatermark

from .conftest import MODEL_NAME
from .processes import serving

KEY, TENANT, LABEL, API_KEY = "deployment-secret", "tenant-b-secret", " [AI-generated]", "sk-wm"
MARK = TextWatermark.from_secret(KEY)


@pytest.fixture(scope="module")
def marked(lm_run, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("wm") / "key"
    key_file.write_text(KEY + "\n")
    with serving(lm_run, ["--watermark-key-file", str(key_file), "--label-text", LABEL, "--api-key", API_KEY],
                 logs=tmp_path_factory.mktemp("wm-logs")) as (server,):
        server.api_key = API_KEY
        yield server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=60)


def _detect(server, **body) -> httpx.Response:
    return httpx.post(server.v1 + "/detect", json=body, headers={"Authorization": f"Bearer {server.api_key}"},
                      timeout=60)


LONG = {"max_tokens": 72, "temperature": 1.0, "extra_body": {"ignore_eos": True}}


def test_responses_say_so_and_the_text_carries_the_label_and_the_watermark(marked):
    raw = _client(marked).chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Explain the with statement"}], seed=1, **LONG)
    assert raw.headers["x-genforge-watermark"] == f"kgw; gamma=0.25; delta=2; key-id={MARK.key_id}"
    chat = raw.parse()
    assert chat.model_extra["watermark"] == {"scheme": "kgw-green-list", "gamma": 0.25, "delta": 2.0,
                                             "key_id": MARK.key_id}
    text = chat.choices[0].message.content
    assert text.endswith(LABEL) and KEY not in raw.http_response.text
    found = _detect(marked, text=text.removesuffix(LABEL)).json()  # the server's own key by default
    assert found["object"] == "watermark.detection" and found["verdict"] == "watermarked", found
    assert found["z_score"] > 4 and found["scored_tokens"] >= 32 and found["key_id"] == MARK.key_id
    other = _detect(marked, text=text.removesuffix(LABEL), key="not-the-key").json()
    assert other["verdict"] == "not_watermarked" and abs(other["z_score"]) < 4
    short = _detect(marked, text="x = 1").json()
    assert short["verdict"] == "too_short" and short["scored_tokens"] < short["min_tokens"]


def test_streams_carry_the_header_the_field_and_end_with_the_label(marked):
    with _client(marked).completions.with_streaming_response.create(
            model=MODEL_NAME, prompt="The for statement", stream=True, seed=2, **LONG) as resp:
        assert resp.headers["x-genforge-watermark"].startswith("kgw; gamma=0.25")
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert events and all(e["watermark"]["key_id"] == MARK.key_id for e in events)
    assert events[-1]["choices"][0]["text"] == LABEL and events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events)
    assert _detect(marked, text=text.removesuffix(LABEL)).json()["verdict"] == "watermarked"


def test_a_request_key_marks_with_the_tenants_key_never_none(marked):
    chat = _client(marked).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is a class"}], seed=3,
        **{**LONG, "extra_body": {"ignore_eos": True, "watermark": {"key": TENANT}}})
    tenant = TextWatermark.from_secret(TENANT)
    assert chat.model_extra["watermark"]["key_id"] == tenant.key_id != MARK.key_id
    text = chat.choices[0].message.content.removesuffix(LABEL)
    assert _detect(marked, text=text, key=TENANT).json()["verdict"] == "watermarked"
    assert _detect(marked, text=text).json()["verdict"] == "not_watermarked"  # not the deployment's key
    with pytest.raises(openai.BadRequestError) as e:  # an empty key does not turn it off
        _client(marked).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, extra_body={"watermark": {"key": ""}})
    assert e.value.body["param"] == "watermark.key"
    assert httpx.post(marked.v1 + "/detect", json={"text": "x"}, timeout=30).status_code == 401  # behind the key


def test_a_plain_server_refuses_request_keys_and_keyless_detection(api):
    c = openai.OpenAI(base_url=api.v1, api_key="x", max_retries=0)
    plain = c.chat.completions.with_raw_response.create(model=MODEL_NAME, max_tokens=2,
                                                         messages=[{"role": "user", "content": "hi"}])
    assert "x-genforge-watermark" not in plain.headers and "watermark" not in plain.parse().model_extra
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  extra_body={"watermark": {"key": "k"}})
    assert e.value.body["param"] == "watermark" and "--watermark" in e.value.body["message"]
    r = httpx.post(api.v1 + "/detect", json={"text": "some text here"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "key"
    r = httpx.post(api.v1 + "/detect", json={"text": "some text", "key": "k", "min_tokens": 0}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    r = httpx.post(api.v1 + "/detect", json={"text": 5, "key": "k"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    ok = httpx.post(api.v1 + "/detect", json={"text": "some text", "key": "k"}, timeout=30).json()
    assert ok["verdict"] == "too_short"


def test_the_cache_key_keeps_keys_labels_and_unmarked_answers_apart():
    """An answer is replayed only under the same exact key: the watermark's key id and the label are in it."""
    from types import SimpleNamespace

    from genforge.serve.labelling import Labelling
    from genforge.serve.pipeline import AppLayer
    from genforge.serve.protocol import ChatCompletionRequest

    def key(labelling: Labelling | None, **extra) -> str:
        layer = SimpleNamespace(labelling=labelling, rag_on=False, info={"embedder_version": "e"},
                                served_name=MODEL_NAME, model_version="v", config=SimpleNamespace(rag=None))
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0, **extra)
        return AppLayer._cache_key(layer, req, [{"role": "user", "content": "hi"}], None)[0]

    marked, other = Labelling(MARK), Labelling(TextWatermark.from_secret("another"))
    keys = [key(None), key(Labelling()), key(marked), key(other), key(Labelling(MARK, LABEL)),
            key(marked, watermark={"key": TENANT})]
    assert keys[0] == keys[1]  # an unmarked deployment's key is what it was before watermarking existed
    assert len(set(keys[1:])) == 5
    assert key(marked) == key(Labelling(TextWatermark.from_secret(KEY)))
