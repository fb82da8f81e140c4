"""The server under faults and slow or impatient clients, end to end over real sockets: engine
faults, queue places of clients that left, deadlines, concurrency, header/body timeouts,
bounded shutdown, the event loop under big prompts, and the metrics that report all of it."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import MODEL_NAME, Live, lm_server, serve_in_thread
from .test_api import wait_for
from .test_api_errors import assert_openai_error

COMP = "/completions"
LONG = {"model": MODEL_NAME, "prompt": "The", "max_tokens": 100, "temperature": 0, "ignore_eos": True}


def engine_of(live: Live):
    return live.app.state.service.engine


def slow_steps(live: Live, seconds: float):
    """Every decode step takes at least `seconds`: requests last as long as a test needs. Returns
    a function that restores full speed."""
    engine = engine_of(live)
    real = engine.gen.step

    def step():
        time.sleep(seconds)
        return real()

    engine.gen.step = step
    return lambda: setattr(engine.gen, "step", real)


def fail_next_step(live: Live, message: str) -> None:
    engine = engine_of(live)
    real = engine.gen.step

    def step():
        engine.gen.step = real
        raise RuntimeError(message)

    engine.gen.step = step


def test_engine_fault_gives_generic_500_and_unhealthy_until_recovered(lm) -> None:
    with lm_server(lm) as live:
        engine_of(live).probe_interval = 3600  # recovery here comes from the next real request
        fail_next_step(live, "secret detail at /srv/models/x.py line 3")
        r = httpx.post(live.v1 + COMP, json={**LONG, "max_tokens": 5}, timeout=30)
        err = assert_openai_error(r, 500, None)
        assert "secret" not in r.text and "RuntimeError" not in r.text and "error id err-" in err["message"]
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and "has not recovered" in health.json()["error"]["message"]
        # streaming: the fault arrives as an error event, again without the exception's text
        fail_next_step(live, "secret again")
        with httpx.stream("POST", live.v1 + COMP, json={**LONG, "max_tokens": 5, "stream": True}, timeout=30) as s:
            events = [line for line in s.iter_lines() if line]
        assert any('"error"' in e and "error id err-" in e for e in events) and "secret" not in "".join(events)
        assert events[-1] == "data: [DONE]"
        ok = httpx.post(live.v1 + COMP, json={**LONG, "max_tokens": 5}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(live.url + "/health").status_code == 200
        assert live.metric("genforge:request_errors_total", kind="engine") == 2


def test_client_that_left_frees_its_queue_place_at_once(lm) -> None:
    """1 slot, 1 queue place: the slot is busy; a queued client times out; the next request must
    get the freed place (not a 503 caused by the dead entry) while the slot is still busy."""
    with lm_server(lm, max_batch_size=1, max_queue=1) as live:
        slow_steps(live, 0.02)
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(httpx.post, live.v1 + COMP, json=LONG, timeout=60)
            wait_for(lambda: live.metric("genforge:num_requests_running") == 1, what="the slot to fill")
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(live.v1 + COMP, json=LONG, timeout=0.5)
            wait_for(lambda: live.metric("genforge:num_requests_waiting") == 0, timeout=2,
                     what="the queue place to be freed")
            assert live.metric("genforge:num_requests_running") == 1  # the occupant still runs
            queued = pool.submit(httpx.post, live.v1 + COMP, json={**LONG, "max_tokens": 3}, timeout=60)
            assert queued.result().status_code == 200
            assert busy.result().status_code == 200


def test_request_that_does_not_fit_leaves_nothing_queued(lm) -> None:
    """n=2 with one queue place left: 503, and its first choice is not left behind in the queue."""
    with lm_server(lm, max_batch_size=1, max_queue=2) as live:
        full_speed = slow_steps(live, 0.02)
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(httpx.post, live.v1 + COMP, json=LONG, timeout=60)]
            wait_for(lambda: live.metric("genforge:num_requests_running") == 1, what="the slot to fill")
            jobs.append(pool.submit(httpx.post, live.v1 + COMP, json=LONG, timeout=60))
            wait_for(lambda: live.metric("genforge:num_requests_waiting") == 1, what="one queued")
            r = httpx.post(live.v1 + COMP, json={**LONG, "n": 2}, timeout=30)
            assert_openai_error(r, 503, None)
            assert r.headers["retry-after"] == "1"
            assert live.metric("genforge:num_requests_waiting") == 1
            full_speed()
            assert all(j.result().status_code == 200 for j in jobs)


def test_request_deadline(lm) -> None:
    with lm_server(lm, request_timeout=0.5) as live:
        slow_steps(live, 0.02)  # 100 tokens take 2 s
        t0 = time.monotonic()
        r = httpx.post(live.v1 + COMP, json=LONG, timeout=30)
        err = assert_openai_error(r, 504, None)
        assert err["code"] == "request_timeout" and "0.5 s" in err["message"]
        assert time.monotonic() - t0 < 1.5
        with httpx.stream("POST", live.v1 + COMP, json={**LONG, "stream": True}, timeout=30) as s:
            events = [line for line in s.iter_lines() if line]
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_timeout"
        assert events[-1] == "data: [DONE]"
        wait_for(lambda: live.metric("genforge:num_requests_running") == 0, what="the sequences to be cancelled")
        assert live.metric("genforge:request_errors_total", kind="timeout") >= 1
        ok = httpx.post(live.v1 + COMP, json={**LONG, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200


def test_limit_concurrency(lm) -> None:
    with lm_server(lm, limit_concurrency=1) as live:
        slow_steps(live, 0.02)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, live.v1 + COMP, json=LONG, timeout=60)
            wait_for(lambda: live.metric("genforge:num_requests_running") == 1, what="the first request")
            r = httpx.post(live.v1 + COMP, json=LONG, timeout=30)
            assert_openai_error(r, 503, None)
            assert r.headers["retry-after"] == "1"
            assert httpx.get(live.url + "/health").status_code == 200  # probes are never limited
            assert first.result().status_code == 200
        assert httpx.post(live.v1 + COMP, json={**LONG, "max_tokens": 2}, timeout=30).status_code == 200


def _raw(live: Live) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_header_and_body_timeouts(lm, http) -> None:
    pytest.importorskip(http)
    with lm_server(lm, config={"header_timeout": 0.5, "http": http}, body_timeout=0.5) as live:
        with _raw(live) as s:  # a header block past the cap is refused, not held in memory
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"a" * 40_000 + b"\r\n")
            reply = _read_all(s)
        assert reply.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400"))
        t0 = time.monotonic()
        t0 = time.monotonic()
        with _raw(live) as s:  # headers that never end
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            reply = _read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        assert time.monotonic() - t0 < 3
        with _raw(live) as s:  # a connection that says nothing is closed too
            assert _read_all(s).startswith(b"HTTP/1.1 408")
        with _raw(live) as s:  # a body that never completes
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            reply = _read_all(s)
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
        # a normal request on a keep-alive connection is unaffected
        with httpx.Client() as c:
            for _ in range(2):
                assert c.get(live.url + "/health").status_code == 200
                time.sleep(0.7)


def test_shutdown_drain_is_bounded(lm) -> None:
    """SIGTERM / should_exit with a stream in flight that would take ~10 s: gone within the bound."""
    from genforge.serve.server import create_app

    model, tokenizer = lm
    app = create_app(model=model, tokenizer=tokenizer, served_model_name=MODEL_NAME)
    got: list[str] = []
    with serve_in_thread(app, shutdown_timeout=0.5) as live:
        live.app = app
        slow_steps(live, 0.1)

        def read() -> None:
            try:
                with httpx.stream("POST", live.v1 + COMP, json={**LONG, "stream": True}, timeout=30) as s:
                    got.extend(line for line in s.iter_lines() if line)
            except httpx.HTTPError:
                got.append("transport error")

        reader = threading.Thread(target=read)
        reader.start()
        wait_for(lambda: len(got) > 0 or live.metric("genforge:num_requests_running") == 1, what="the stream")
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5
    reader.join(timeout=10)
    assert not reader.is_alive() and "data: [DONE]" not in got  # cut short, not run to its end


class SlowTokenizer:
    """The lm-nano tokenizer, but tokenizing a big input takes a second (as a huge prompt would)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, *args, **kwargs):
        size = len(text) if isinstance(text, str) else sum(len(t) for t in text)
        if size > 10_000:
            time.sleep(1.0)
        return self._inner(text, *args, **kwargs)

    def __len__(self):
        return len(self._inner)


def test_big_prompts_do_not_block_the_event_loop(lm) -> None:
    model, tokenizer = lm
    with lm_server((model, SlowTokenizer(tokenizer))) as live:
        big = "word " * 4000
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(httpx.post, live.v1 + COMP, json={"prompt": big, "max_tokens": 1}, timeout=30),
                    pool.submit(httpx.post, live.v1 + "/chat/completions", timeout=30,
                                json={"messages": [{"role": "user", "content": big}], "max_tokens": 1})]
            time.sleep(0.2)
            worst = 0.0
            while not all(j.done() for j in jobs):
                t0 = time.monotonic()
                assert httpx.get(live.url + "/health", timeout=10).status_code == 200
                worst = max(worst, time.monotonic() - t0)
        assert worst < 0.5, f"/health waited {worst:.2f} s behind a tokenization"
        assert [j.result().status_code for j in jobs] == [400, 400]  # too long for the context, said after


def test_metrics_ttft_at_the_socket_queue_time_kv_and_errors(lm) -> None:
    with lm_server(lm, max_batch_size=2) as live:
        slow_steps(live, 0.01)
        before = live.metric("genforge:time_to_first_token_seconds_sum")
        t0 = time.monotonic()
        r = httpx.post(live.v1 + COMP, json={**LONG, "max_tokens": 60}, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 200
        # non-streamed: the client sees its first token with the whole body, ~60 steps later
        ttft = live.metric("genforge:time_to_first_token_seconds_sum") - before
        assert 0.8 * took <= ttft <= took, (ttft, took)
        with httpx.stream("POST", live.v1 + COMP, json={**LONG, "max_tokens": 60, "stream": True}, timeout=30) as s:
            lines = [line for line in s.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert live.metric("genforge:time_to_first_token_seconds_count") == 2
        assert live.metric("genforge:request_queue_time_seconds_count") == 2
        text = httpx.get(live.url + "/metrics").text
        assert "genforge:kv_cache_usage_perc" in text
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(httpx.post, live.v1 + COMP, json=LONG, timeout=30)
            wait_for(lambda: live.metric("genforge:kv_cache_usage_perc") > 0, what="KV usage while running")
            assert job.result().status_code == 200
        httpx.post(live.v1 + COMP, json={"prompt": "x", "max_tokens": 0})
        httpx.get(live.v1 + "/nope")
        assert live.metric("genforge:request_errors_total", kind="invalid_request") == 1
        assert live.metric("genforge:request_errors_total", kind="not_found") == 1
        assert f'model_name="{MODEL_NAME}"' in text


def test_a_bug_gives_a_generic_500_with_an_error_id(lm) -> None:
    with lm_server(lm) as live:
        service = live.app.state.service

        async def broken(body, request):
            raise KeyError("secret key name /etc/passwd")

        service.completions = broken
        r = httpx.post(live.v1 + COMP, json={"prompt": "x"}, timeout=30)
        err = assert_openai_error(r, 500, None)
        assert "secret" not in r.text and "KeyError" not in r.text and "error id err-" in err["message"]
        assert live.metric("genforge:request_errors_total", kind="internal") == 1
        assert httpx.post(live.v1 + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 2}, timeout=30).status_code == 200


def test_stream_interval_sends_fewer_chunks_with_the_same_text(lm) -> None:
    body = {**LONG, "max_tokens": 13, "stream": True}
    with lm_server(lm, stream_interval=4) as live:
        with httpx.stream("POST", live.v1 + COMP, json=body, timeout=30) as s:
            parts = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        whole = httpx.post(live.v1 + COMP, json={**body, "stream": False}, timeout=30).json()
    texts = [p["choices"][0]["text"] for p in parts]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert len(parts) <= 5  # the first token at once, then one chunk per 4 tokens (13 = 1 + 4 + 4 + 4)
    assert parts[-1]["choices"][0]["finish_reason"] == "length"
