"""The judge's transport retries (eval/judge.py `Judge._complete`) against a real HTTP server on a real
port that answers as scripted: 429 and 503 retried with backoff, a Retry-After honoured (bounded), a
judge that always fails ends in JudgeUnreachableError, a 400 is not retried.

A stdlib server rather than `genforge serve`: these are the answers a healthy genforge serve never
gives on demand (a rate limit, an overloaded proxy, a crashing upstream), and the real `openai`
client is still what talks to it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from genforge.eval.judge import Judge, JudgeConfig, JudgeError, JudgeUnreachableError, retry_after

JUDGMENT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": '{"score": 7, "reason": "fine"}'}}]}


def error(status: int, message: str, headers: dict | None = None) -> tuple[int, dict, dict]:
    return status, headers or {}, {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


OK = (200, {}, JUDGMENT)


class Scripted:
    """The answers still to give (the last one repeats) and when each request arrived."""

    def __init__(self, answers: list[tuple[int, dict, dict]]):
        self.answers = list(answers)
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        self.url = ""

    def next(self) -> tuple[int, dict, dict]:
        with self.lock:
            self.arrivals.append(time.monotonic())
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


@contextlib.contextmanager
def scripted_judge(*answers: tuple[int, dict, dict]) -> Iterator[Scripted]:
    script = Scripted(list(answers))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            self.rfile.read(int(self.headers.get("content-length", 0)))
            status, headers, body = script.next()
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in {"content-type": "application/json", "content-length": str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield script
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def judge_once(script: Scripted, **kw) -> tuple[dict, Judge]:
    judge = Judge(JudgeConfig(url=script.url, model="judge", **{"retries": 4, "backoff": 0.05, **kw}))
    try:
        return judge.pointwise("q?", "a"), judge
    finally:
        judge.close()


def test_a_429_then_a_503_are_retried_with_growing_backoff_then_the_judgment_succeeds():
    with scripted_judge(error(429, "slow down"), error(503, "overloaded"), OK) as script:
        outcome, judge = judge_once(script, backoff=0.05)
    assert outcome["ok"] and outcome["score"] == 7 and outcome["attempts"] == 1
    assert len(script.arrivals) == 3 == judge.http_calls
    first, second = script.gaps()
    assert first >= 0.05 and second >= 0.1  # backoff, doubled after each retry (jitter only adds)


def test_a_retry_after_header_sets_the_wait_and_is_bounded():
    with scripted_judge(error(429, "slow down", {"Retry-After": "1"}), OK) as script:
        outcome, _ = judge_once(script, backoff=0.001)
    assert outcome["ok"] and script.gaps()[0] >= 0.95  # the server's 1 s, not the 1 ms backoff
    # A server asking for an hour gets at most retry_after_max.
    with scripted_judge(error(429, "slow down", {"Retry-After": "3600"}), OK) as script:
        outcome, _ = judge_once(script, backoff=0.001, retry_after_max=0.3)
    assert outcome["ok"] and 0.25 <= script.gaps()[0] < 5


def test_retry_after_reads_seconds_milliseconds_and_http_dates():
    def asked(headers: dict, cap: float = 10.0) -> float | None:
        return retry_after(httpx.Response(429, headers=headers), cap)

    assert asked({"Retry-After": "2"}) == 2.0
    assert asked({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25  # the finer one wins
    assert 2 <= asked({"Retry-After": formatdate(time.time() + 4, usegmt=True)}) <= 4
    assert asked({"Retry-After": formatdate(time.time() - 60, usegmt=True)}) == 0.0  # a past date: no wait
    assert asked({"Retry-After": "120"}, cap=10) == 10.0
    assert asked({"Retry-After": "soon"}) is None and asked({"Retry-After": "nan"}) is None and asked({}) is None
    assert retry_after(None, 10) is None  # a connection error has no response


def test_a_judge_that_always_answers_500_is_unreachable_after_retries_plus_one_calls():
    with scripted_judge(error(500, "upstream crashed")) as script:
        with pytest.raises(JudgeUnreachableError, match=r"did not answer after 3 tries: it answered 500: .*"
                                                        r"upstream crashed.*check that it is running") as info:
            judge_once(script, retries=2, backoff=0.01)
    assert len(script.arrivals) == 3
    assert script.url in str(info.value)


def test_a_400_is_not_retried():
    with scripted_judge(error(400, "max_tokens is too large"), OK) as script:
        with pytest.raises(JudgeError, match=r"rejected the request \(400\): max_tokens is too large$") as info:
            judge_once(script)
    assert not isinstance(info.value, JudgeUnreachableError)
    assert len(script.arrivals) == 1  # the OK after it was never asked for
