"""Structured outputs (`response_format`) end to end: a real server, the openai client, a tiny
random-weight Llama. Random weights are the hard case: nothing but the grammar makes the answer JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.serve.conftest import MODEL_NAME, Live, serve_in_thread

VERDICT = {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
           "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                          "reason": {"type": "string", "maxLength": 10}}}
VERDICT_ENUM = {**VERDICT, "properties": {**VERDICT["properties"],
                                          "score": {"type": "integer", "enum": list(range(1, 11))}}}
ASK = [{"role": "user", "content": "Rate: fox"}]  # short: the tiny model's context is 128 tokens


def json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}


def check_verdict(text: str) -> None:
    """VERDICT checked by hand (no jsonschema in the dependencies): the two fields, in range."""
    obj = json.loads(text)
    assert set(obj) == {"score", "reason"}, text
    assert isinstance(obj["score"], int) and not isinstance(obj["score"], bool), text
    assert 1 <= obj["score"] <= 10, text
    assert isinstance(obj["reason"], str) and len(obj["reason"]) <= 10, text


@pytest.fixture(scope="module")
def judge(model, tok) -> Iterator[Live]:
    """A server over the session's random tiny Llama (conftest's `model`, `tok`)."""
    from genforge.serve.server import create_app

    app = create_app(model=model, tokenizer=tok, served_model_name=MODEL_NAME)
    with serve_in_thread(app) as live:
        live.app = app  # its state holds the service: the engine's step count, the grammar cache
        yield live


@pytest.fixture(scope="module")
def client(judge: Live) -> openai.OpenAI:
    return openai.OpenAI(base_url=judge.v1, api_key="unused", max_retries=0, timeout=60)


def concurrently(*calls) -> list:
    out: list = [None] * len(calls)

    def run(i: int) -> None:
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_json_schema_answers_validate_across_seeds_and_temperatures(client):
    settings = [(seed, temp, top_p) for seed, temp, top_p in
                [(1, 1.0, 1.0), (2, 1.3, 1.0), (3, 0.7, 0.9), (4, 0.0, 1.0), (5, 1.0, 0.5), (6, 2.0, 1.0)]]
    schemas = [VERDICT, VERDICT_ENUM]
    replies = concurrently(*[
        (lambda s=s, t=t, p=p, i=i: client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, response_format=json_schema(schemas[i % 2]), seed=s,
            temperature=t, top_p=p, max_tokens=64))
        for i, (s, t, p) in enumerate(settings)])
    texts = []
    for r in replies:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        check_verdict(choice.message.content)
        texts.append(choice.message.content)
    assert len(set(texts)) > 1  # the grammar constrains the sampler, it does not replace it


def test_completions_endpoint_takes_response_format_too(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Verdict:", max_tokens=64, seed=9, n=2,
                                  extra_body={"response_format": json_schema(VERDICT)})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        check_verdict(choice.text)


def test_json_object_gives_a_json_object(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format={"type": "json_object"},
                                       seed=3, max_tokens=64)
    choice = r.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # an unbounded object may run out of tokens: then it says so
        assert choice.finish_reason == "length"
    assert choice.message.content.startswith("{")


def test_streamed_chunks_concatenate_to_valid_json(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=json_schema(VERDICT),
                                            seed=7, temperature=1.0, max_tokens=64, stream=True)
    parts, finish = [], []
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish.append(c.finish_reason)
    assert finish[-1] == "stop" and len([p for p in parts if p]) > 3
    check_verdict("".join(parts))


def test_mixed_batch_leaves_free_text_unchanged(client, judge):
    def free() -> str:
        r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, seed=11, temperature=1.0,
                                           max_tokens=40, extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    alone = free()
    engine = judge.app.state.service.engine
    steps_before = engine.steps
    together = concurrently(free, *[
        (lambda s=s: client.chat.completions.create(model=MODEL_NAME, messages=ASK, seed=s, max_tokens=64,
                                                    response_format=json_schema(VERDICT)))
        for s in (21, 22, 23)])
    assert together[0] == alone
    for r in together[1:]:
        check_verdict(r.choices[0].message.content)
    # they shared decode steps: four requests of 40+ tokens in fewer steps than run one after another
    assert engine.steps - steps_before < 40 + sum(r.usage.completion_tokens for r in together[1:])


def test_max_tokens_before_the_json_closes_is_length(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, response_format=json_schema(VERDICT),
                                       seed=1, max_tokens=5)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


BAD_FORMATS = [
    ("unknown-type", {"type": "yaml"}, "unknown type 'yaml'"),
    ("no-json-schema", {"type": "json_schema"}, "json_schema"),
    ("bad-name", {"type": "json_schema", "json_schema": {"name": "a b", "schema": VERDICT}}, "name"),
    ("schema-not-object", {"type": "json_schema", "json_schema": {"name": "v", "schema": [1]}}, "schema"),
    ("unknown-json-type", json_schema({"type": "intger"}), "intger"),
    ("dangling-ref", json_schema({"$ref": "#/nowhere"}), "nowhere"),
    ("bad-pattern", json_schema({"type": "string", "pattern": "(("}), "regex"),
]


@pytest.mark.parametrize(("fmt", "says"), [b[1:] for b in BAD_FORMATS], ids=[b[0] for b in BAD_FORMATS])
def test_bad_response_format_is_a_400_naming_it(judge, fmt, says):
    for path, body in (("/chat/completions", {"messages": ASK}), ("/completions", {"prompt": "x"})):
        r = httpx.post(judge.v1 + path, json={"model": MODEL_NAME, "max_tokens": 4, "response_format": fmt, **body},
                       timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and err["type"] == "invalid_request_error"
        assert says in err["message"], err["message"]


def test_a_failed_compile_leaves_the_server_serving_and_compiles_are_cached(client, judge):
    grammars = judge.app.state.service.grammars
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=4,
                                       response_format=json_schema({"type": "nope"}))
    schema = {**VERDICT, "description": "compiled once"}
    before = grammars.compiles
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, seed=seed, max_tokens=64,
                                           response_format=json_schema(schema))
        check_verdict(r.choices[0].message.content)
    assert grammars.compiles == before + 1
    assert httpx.get(judge.url + "/health", timeout=10).status_code == 200
