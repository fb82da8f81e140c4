"""The OpenAI-compatible API through the real `openai` client, real uvicorn, real sockets.

Fixtures (conftest.py): `api` (default limits), `tiny_api` (1 slot, 1 queue place), `cli_api`
(`genforge serve` as a subprocess with API keys), all serving one briefly trained lm-nano.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import MODEL_NAME, Live

PROMPTS = ["The list", "def f(x):\n    return", "In Python, a class", "import", "for i in range(",
           "The with statement is used to", "x", "Exceptions are"]


def client(live: Live, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.v1, api_key=live.api_key, max_retries=0, timeout=60, **kw)


def greedy_completion(c: openai.OpenAI, prompt: str | list[int], max_tokens: int = 16, **kw):
    return c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_models_and_health(api: Live) -> None:
    models = client(api).models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert httpx.get(api.url + "/health").json() == {"status": "ok"}


def test_completion(api: Live) -> None:
    out = greedy_completion(client(api), "The list", max_tokens=12, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL_NAME and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    # without max_tokens a request may use the rest of the context
    rest = client(api).completions.create(model=MODEL_NAME, prompt="The list", temperature=0,
                                          extra_body={"ignore_eos": True})
    limit = client(api).models.list().data[0].model_extra["max_model_len"]
    assert rest.usage.total_tokens == limit and rest.choices[0].finish_reason == "length"


def test_serves_a_plain_hf_folder(lm_run, api: Live) -> None:
    """RUN/model is a plain Hugging Face folder; served from its path it answers like the run."""
    from genforge.serve.server import create_app

    from .conftest import serve_in_thread

    with serve_in_thread(create_app(lm_run / "model", max_model_len=64)) as live:
        c = client(live)
        [card] = c.models.list().data
        # served under the run's name, never a path; the path it was started with still works
        assert card.id == lm_run.name and card.model_extra["max_model_len"] == 64
        assert str(lm_run) not in httpx.get(live.url + "/metrics").text
        assert c.completions.create(model=str(lm_run / "model"), prompt="x", max_tokens=1).choices
        messages = [{"role": "user", "content": "What is a tuple?"}]
        here = c.chat.completions.create(model=card.id, messages=messages, max_tokens=8, temperature=0)
        there = client(api).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8,
                                                    temperature=0)
        assert here.choices[0].message.content == there.choices[0].message.content


def test_completion_prompt_forms(api: Live, lm) -> None:
    """A string, a batch of strings, token ids and a batch of token ids give the same greedy text."""
    _, tokenizer = lm
    c = client(api)
    ids = tokenizer("The list")["input_ids"]
    single = greedy_completion(c, "The list").choices[0].text
    assert greedy_completion(c, ids).choices[0].text == single
    batch = greedy_completion(c, ["The list", "import"], n=2)
    assert [ch.index for ch in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == single  # greedy: n copies agree
    assert batch.choices[2].text == greedy_completion(c, "import").choices[0].text
    assert greedy_completion(c, [ids, ids]).choices[1].text == single
    echoed = greedy_completion(c, "The list", echo=True).choices[0].text
    assert echoed == "The list" + single


def test_chat(api: Live, lm) -> None:
    from genforge.serve.chat import render_chat, resolve_chat_template
    from genforge.serve.protocol import ChatMessage

    _, tokenizer = lm
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]
    out = client(api).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    expected = render_chat(tokenizer, resolve_chat_template(tokenizer), [ChatMessage(**m) for m in messages])
    assert out.usage.prompt_tokens == len(expected)  # the model's own template was applied
    # max_completion_tokens is the newer name of max_tokens
    out2 = client(api).chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=3,
                                               temperature=0, extra_body={"ignore_eos": True})
    assert out2.usage.completion_tokens == 3 and out2.choices[0].finish_reason == "length"


def test_chat_stream_with_usage(api: Live) -> None:
    c = client(api)
    messages = [{"role": "user", "content": "Explain the for statement."}]
    whole = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_raw_sse(api: Live) -> None:
    """The wire format itself: `data: {json}` events, ending in `data: [DONE]`."""
    body = {"model": MODEL_NAME, "prompt": "The list", "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", api.v1 + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    parts = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in parts)
    text = "".join(p["choices"][0]["text"] for p in parts)
    assert text == greedy_completion(client(api), "The list", max_tokens=10).choices[0].text


def test_n_with_seed_differs_and_reproduces(api: Live) -> None:
    c = client(api)
    kw = dict(model=MODEL_NAME, prompt="The", max_tokens=12, temperature=1.0, seed=123)
    first = c.completions.create(n=3, **kw)
    again = c.completions.create(n=3, **kw)
    texts = [ch.text for ch in first.choices]
    assert texts == [ch.text for ch in again.choices]
    assert len(set(texts)) > 1
    # choice i samples with seed + i: the same as a single request with that seed
    kw.pop("seed")
    assert c.completions.create(seed=124, **kw).choices[0].text == texts[1]
    assert first.usage.completion_tokens == sum(
        len(ch.logprobs.tokens) for ch in c.completions.create(n=3, seed=123, logprobs=0, **kw).choices)


def test_chat_n_stream(api: Live) -> None:
    chunks = list(client(api).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, n=2, seed=5, stream=True))
    by_index: dict[int, str] = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch.choices:
            by_index[choice.index] += choice.delta.content or ""
    whole = client(api).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, n=2, seed=5)
    assert by_index == {c.index: c.message.content for c in whole.choices}


def test_stop_sequences(api: Live) -> None:
    c = client(api)
    full = greedy_completion(c, "The list", max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    # the stop string: the two characters whose first occurrence comes latest (the text is cut there);
    # a small model's greedy text repeats itself, so "a pair that first occurs at k" may not exist
    stop = max((full[k:k + 2] for k in range(len(full) - 1) if full[k:k + 2].strip()), key=full.find)
    cut = full.find(stop)
    assert cut > 0, full
    out = greedy_completion(c, "The list", max_tokens=30, stop=[stop, "@@never@@"],
                            extra_body={"ignore_eos": True}).choices[0]
    assert out.text == full[:cut] and out.finish_reason == "stop"
    # a plain string works too
    assert greedy_completion(c, "The list", max_tokens=30, stop=stop,
                             extra_body={"ignore_eos": True}).choices[0].text == full[:cut]


def test_logprobs(api: Live) -> None:
    c = client(api)
    out = greedy_completion(c, "The list", max_tokens=6, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.text
    for _tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely
    chat = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.bytes == list(t.token.encode()) for t in content)


def test_concurrent_greedy_equals_sequential(api: Live) -> None:
    """Continuous batching must not change greedy output: different prompts and lengths join and
    leave the batch at different steps, and each still gets exactly its solo tokens."""
    c = client(api)
    jobs = [(p, 8 + 5 * i) for i, p in enumerate(PROMPTS)]

    def run(job):
        prompt, n = job
        ch = greedy_completion(c, prompt, max_tokens=n, logprobs=0).choices[0]
        return ch.text, ch.logprobs.tokens, ch.finish_reason

    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential


def test_metrics_after_requests(api: Live) -> None:
    before = api.metric("genforge:generation_tokens_total")
    greedy_completion(client(api), "The list", max_tokens=5, extra_body={"ignore_eos": True})
    assert api.metric("genforge:generation_tokens_total") == before + 5
    assert api.metric("genforge:prompt_tokens_total") > 0
    text = httpx.get(api.url + "/metrics").text
    for name in ("genforge:num_requests_running", "genforge:num_requests_waiting",
                 "genforge:time_to_first_token_seconds_bucket", "genforge:inter_token_latency_seconds_bucket",
                 "genforge:e2e_request_latency_seconds_count", "genforge:request_success_total"):
        assert name in text, name
    assert api.metric("genforge:request_success_total", finished_reason="length") >= 1
    assert api.metric("genforge:http_requests_total", endpoint="/v1/completions", status="200") >= 1
    httpx.post(api.v1 + "/completions", json={"prompt": "x", "max_tokens": 0})
    assert api.metric("genforge:http_requests_total", endpoint="/v1/completions", status="400") >= 1


def test_queue_full_gives_503(tiny_api: Live) -> None:
    """1 batch slot + 1 queue place, 6 requests at once: the overflow gets 503 + Retry-After
    with an OpenAI error body; the rest complete normally."""
    body = {"model": MODEL_NAME, "prompt": "The", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    start = threading.Barrier(6)

    def post(_: int) -> httpx.Response:
        start.wait()
        return httpx.post(tiny_api.v1 + "/completions", json=body, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 200 and codes[-1] == 503 and set(codes) == {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 100
    assert tiny_api.metric("genforge:http_requests_total", status="503") == codes.count(503)
    assert tiny_api.metric("genforge:num_requests_running") == 0


# n=8 x 120 tokens on a 1-slot server: 960 decode steps in a row, far longer than the client waits.
_SLOW = {"model": MODEL_NAME, "prompt": "The", "n": 8, "max_tokens": 120, "temperature": 0, "ignore_eos": True}


def _assert_cancelled(live: Live, tokens_before: float, aborted_before: float) -> None:
    wait_for(lambda: live.metric("genforge:num_requests_running") == 0
             and live.metric("genforge:num_requests_waiting") == 0, what="the engine to drop the request")
    assert live.metric("genforge:request_success_total", finished_reason="abort") > aborted_before
    # Had the request run on, all 8 x 120 tokens would have been generated.
    assert live.metric("genforge:generation_tokens_total") - tokens_before < 8 * 120


def test_streaming_client_disconnect_cancels(serial_api: Live) -> None:
    tokens, aborted = (serial_api.metric("genforge:generation_tokens_total"),
                       serial_api.metric("genforge:request_success_total", finished_reason="abort"))
    with httpx.stream("POST", serial_api.v1 + "/completions", json={**_SLOW, "stream": True}, timeout=30) as r:
        assert next(r.iter_lines()).startswith("data: ")
    _assert_cancelled(serial_api, tokens, aborted)


def test_non_streaming_client_disconnect_cancels(serial_api: Live) -> None:
    tokens, aborted = (serial_api.metric("genforge:generation_tokens_total"),
                       serial_api.metric("genforge:request_success_total", finished_reason="abort"))
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.2) as c:
        c.post(serial_api.v1 + "/completions", json=_SLOW)
    _assert_cancelled(serial_api, tokens, aborted)
    assert serial_api.metric("genforge:http_requests_total", endpoint="/v1/completions", status="499") >= 1


@pytest.mark.slow
def test_cli_serve_auth(cli_api, api: Live) -> None:
    """`genforge serve` end to end: keys from --api-key and GENFORGE_API_KEYS; same model, same text."""
    from .conftest import Live as _Live

    for key in ("sk-test", "env-key"):
        keyed = client(_Live(cli_api.url, api_key=key))
        out = greedy_completion(keyed, "The list", max_tokens=10)
        assert out.choices[0].text == greedy_completion(client(api), "The list", max_tokens=10).choices[0].text
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            greedy_completion(client(_Live(cli_api.url, api_key=key or "x")), "x")
        assert e.value.status_code == 401
    r = httpx.post(cli_api.v1 + "/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(cli_api.v1 + "/models").status_code == 401
    assert httpx.get(cli_api.url + "/health").status_code == 200  # probes need no key
    assert "genforge:http_requests_total" in httpx.get(cli_api.url + "/metrics").text


@pytest.mark.slow
def test_cli_sigterm_finishes_inflight_stream(cli_api) -> None:
    """SIGTERM: no new requests, but the stream in flight runs to its last token. (Runs last: it
    stops the session's CLI server.)"""
    body = {"model": MODEL_NAME, "prompt": "The", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {cli_api.api_key}"}
    events = []
    with httpx.stream("POST", cli_api.v1 + "/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        cli_api.proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 100
    cli_api.proc.wait(timeout=30)
    assert cli_api.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    with pytest.raises(httpx.TransportError):
        httpx.get(cli_api.url + "/health", timeout=2)


@pytest.mark.slow
def test_cli_serve_bad_model_is_one_line_error(tmp_path) -> None:
    import subprocess

    from .conftest import _genforge_command

    r = subprocess.run([*_genforge_command(), "serve", str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: model not found") and len(r.stderr.strip().splitlines()) == 1
