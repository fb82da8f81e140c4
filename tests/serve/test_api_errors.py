"""Bad input gets a 4xx with an OpenAI-style error naming the field, never a 5xx, and the server
keeps serving. Raw httpx here: the openai client would refuse to send most of these bodies."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from .conftest import MODEL_NAME, Live

CHAT = "/chat/completions"
COMP = "/completions"
MSGS = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["message"]
    return err


CASES = [
    # (id, path, body, status, param)
    ("wrong-type-temperature", COMP, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("wrong-type-prompt", COMP, {"prompt": 5}, 400, "prompt"),
    ("wrong-type-messages", CHAT, {"messages": "hi"}, 400, "messages"),
    ("bad-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("missing-prompt", COMP, {"model": MODEL_NAME}, 400, "prompt"),
    ("negative-token-id-echo", COMP, {"prompt": [-1], "echo": True}, 400, "prompt"),  # found by the fuzz test
    ("token-id-past-vocab", COMP, {"prompt": [10**9]}, 400, "prompt"),
    ("unknown-model", COMP, {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("unknown-model-chat", CHAT, {"model": "gpt-9", "messages": MSGS}, 404, "model"),
    ("max-tokens-zero", COMP, {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, {"messages": MSGS, "max_tokens": -3}, 400, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, {"messages": MSGS, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("max-tokens-beyond-context", COMP, {"prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ("max-completion-tokens-beyond-context", CHAT, {"messages": MSGS, "max_completion_tokens": 100_000}, 400,
     "max_completion_tokens"),
    ("temperature-high", COMP, {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("temperature-negative", CHAT, {"messages": MSGS, "temperature": -0.1}, 400, "temperature"),
    ("top-p-high", COMP, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top-p-zero", CHAT, {"messages": MSGS, "top_p": 0}, 400, "top_p"),
    ("n-zero", COMP, {"prompt": "x", "n": 0}, 400, "n"),
    ("presence-penalty", COMP, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("logprobs-too-many", COMP, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("top-logprobs-without-logprobs", CHAT, {"messages": MSGS, "top_logprobs": 2}, 400, "top_logprobs"),
    ("min-tokens-over-max", COMP, {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages"),
    ("empty-prompt-list", COMP, {"prompt": []}, 400, "prompt"),
    ("prompt-too-long", COMP, {"prompt": [5] * 300}, 400, "prompt"),
    ("token-id-outside-vocab", COMP, {"prompt": [1, 10**9]}, 400, "prompt"),
    ("prompt-string-too-long", COMP, {"prompt": "word " * 2000}, 400, "prompt"),
    ("messages-too-long", CHAT, {"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_field(api: Live, path: str, body: dict, status: int, param: str) -> None:
    err = assert_openai_error(httpx.post(api.v1 + path, json=body, timeout=30), status, param)
    assert param.split("[")[0] in err["message"]


@pytest.mark.parametrize(("raw", "what"), [(b'{"prompt": "x",', "not valid JSON"), (b"[1, 2]", "JSON object"),
                                           (b"", "missing"), (b"\xff\xfe", "JSON")])
def test_malformed_body(api: Live, raw: bytes, what: str) -> None:
    r = httpx.post(api.v1 + COMP, content=raw, headers={"content-type": "application/json"})
    assert what in assert_openai_error(r, 400, None)["message"]


def test_body_over_limit(api: Live) -> None:
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    assert_openai_error(httpx.post(api.v1 + COMP, content=big, headers={"content-type": "application/json"}),
                        413, None)

    def chunked():  # no Content-Length: the server has to count as the body arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = httpx.post(api.v1 + COMP, content=chunked(), headers={"content-type": "application/json"})
    assert "transfer-encoding" not in r.request.headers or r.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(r, 413, None)


def test_unknown_fields_ignored_and_unknown_route(api: Live) -> None:
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "user": "u1", "store": False, "whatever": {"a": 1}}
    assert httpx.post(api.v1 + COMP, json=body, timeout=30).status_code == 200
    err = assert_openai_error(httpx.get(api.v1 + "/nope"), 404, None)
    assert err["type"] == "not_found_error"
    assert_openai_error(httpx.get(api.v1 + COMP), 405, None)


def test_openai_client_sees_bad_request(api: Live) -> None:
    c = openai.OpenAI(base_url=api.v1, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL_NAME, prompt="x", temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="other", messages=MSGS)


def test_bad_requests_do_not_disturb_others(api: Live) -> None:
    """A generation in flight completes normally while a burst of bad requests is answered."""
    good: dict = {}
    body = {"model": MODEL_NAME, "prompt": "The list", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    t = threading.Thread(target=lambda: good.update(r=httpx.post(api.v1 + COMP, json=body, timeout=60)))
    t.start()
    for _path, bad, status, _param in [c[1:] for c in CASES] * 2:
        assert httpx.post(api.v1 + _path, json=bad, timeout=30).status_code == status
    httpx.post(api.v1 + COMP, content=b"{oops", headers={"content-type": "application/json"})
    t.join(timeout=60)
    assert good["r"].status_code == 200
    assert good["r"].json()["usage"]["completion_tokens"] == 40
    assert httpx.get(api.url + "/health").status_code == 200
    assert api.metric("genforge:http_requests_total", status="500") == 0
