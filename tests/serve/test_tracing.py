"""Tracing and request ids end to end: `genforge serve --trace otlp` exporting to a real OTLP/HTTP receiver
(tests/serve/otlp_receiver.py), the real openai client, and the server's log lines."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("sentence_transformers")

from .conftest import MODEL_NAME, ROOT, CliServer, _genforge_command, free_socket, lm_server  # noqa: E402
from .otlp_receiver import receiving  # noqa: E402
from .processes import CHILD_ENV, _stop, _wait_healthy  # noqa: E402

KEY = "sk-trace"
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def traced(lm_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """`genforge serve --trace otlp` with every request-path step on (auth, guard, cache), exporting to
    a receiver in this process; (server, receiver)."""
    tmp = tmp_path_factory.mktemp("traced")
    with receiving() as receiver:
        sock = free_socket()
        port = sock.getsockname()[1]
        sock.close()  # the CLI binds it itself
        log = tmp / "serve.log"
        env = {**CHILD_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with log.open("wb") as out:
            proc = subprocess.Popen([*_genforge_command(), "serve", str(lm_run), "--port", str(port),
                                     "--served-model-name", MODEL_NAME, "--enforce-eager", "--trace", "otlp",
                                     "--api-key", KEY, "--guard", "redact", "--cache", "--state-dir", str(tmp)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        server = CliServer(f"http://127.0.0.1:{port}", api_key=KEY, proc=proc, log=log)
        try:
            _wait_healthy(server, time.monotonic() + 120)
            yield server, receiver
        finally:
            _stop(server)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)


def _children(spans, parent) -> list[str]:
    return sorted(s.name for s in spans if s.parent_id == parent.span_id)


def test_a_chat_request_is_one_trace_with_a_span_per_step(traced):
    server, receiver = traced
    raw = _client(server).chat.completions.with_raw_response.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Write to john.doe@example.com about the bug."}],
        max_tokens=8, temperature=0, extra_headers={"x-request-id": "client-req-1"})
    assert raw.headers["x-request-id"] == "client-req-1"
    usage = raw.parse().usage
    spans = receiver.trace_of("client-req-1", {"decode", "cache_put", "respond"})

    (root,) = [s for s in spans if s.parent_id is None]
    assert root.name == "POST /v1/chat/completions" and root.kind == "SPAN_KIND_SERVER" and not root.error
    assert root.attributes["http.response.status_code"] == 200
    assert root.resource["service.name"] == "genforge"
    assert _children(spans, root) == sorted(["auth", "validate", "prepare", f"chat {MODEL_NAME}", "settle",
                                             "guard_output", "cache_put", "respond"])
    by_name = {s.name: s for s in spans}
    assert _children(spans, by_name["prepare"]) == ["guard_input"]  # the rules and PII, before the engine
    assert _children(spans, by_name["settle"]) == ["cache_lookup", "guard_input"]  # the detector, the lookup
    gen = by_name[f"chat {MODEL_NAME}"]
    assert _children(spans, gen) == ["decode", "prefill", "queue_wait"]
    assert gen.attributes["gen_ai.operation.name"] == "chat"
    assert gen.attributes["gen_ai.request.model"] == MODEL_NAME
    assert gen.attributes["gen_ai.request.max_tokens"] == 8
    decode = by_name["decode"]
    assert decode.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert decode.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert gen.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    # the engine's phases follow each other inside the request
    queue, prefill = by_name["queue_wait"], by_name["prefill"]
    assert root.start <= queue.start <= queue.end <= prefill.start <= prefill.end <= decode.start <= decode.end
    assert decode.end <= root.end and by_name["respond"].end <= root.end


def test_a_streamed_request_gets_a_generated_id_on_its_response_and_trace(traced):
    server, receiver = traced
    for sent in (None, "not a safe id!"):  # none given, or one that is not safe to echo: a fresh one
        raw = _client(server).chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Say something about lists."}],
            max_tokens=6, temperature=0.7, stream=True, stream_options={"include_usage": True},
            extra_headers={"x-request-id": sent} if sent else None)
        rid = raw.headers["x-request-id"]
        assert HEX_ID.fullmatch(rid)
        usage = [c.usage for c in raw.parse() if c.usage][0]
        spans = receiver.trace_of(rid, {"decode", "respond"})
        decode = next(s for s in spans if s.name == "decode")
        assert decode.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert "cache_put" not in {s.name for s in spans}  # sampled: not cacheable


def test_errors_carry_the_request_id_on_the_response_and_the_span(traced):
    server, receiver = traced
    auth = {"authorization": f"Bearer {KEY}"}
    bad = httpx.post(server.v1 + "/chat/completions", json={"model": MODEL_NAME},
                     headers={**auth, "x-request-id": "bad-body-1"}, timeout=30)
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-body-1"
    spans = receiver.trace_of("bad-body-1", {"validate"})
    root = next(s for s in spans if s.parent_id is None)
    assert root.attributes["error.type"] == "invalid_request" and root.attributes["http.response.status_code"] == 400
    assert next(s for s in spans if s.name == "validate").error

    unknown = httpx.post(server.v1 + "/chat/completions", headers={**auth, "x-request-id": "no-model-1"},
                         json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] == "no-model-1"
    root = next(s for s in receiver.trace_of("no-model-1") if s.parent_id is None)
    assert root.attributes["error.type"] == "not_found"

    denied = httpx.get(server.v1 + "/models", headers={"x-request-id": "no-key-1"}, timeout=30)
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "no-key-1"
    spans = receiver.trace_of("no-key-1", {"auth"})
    assert next(s for s in spans if s.name == "auth").error


def test_log_lines_written_for_a_request_name_its_id(lm):
    from genforge.serve.tracing import RequestIdFilter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(RequestIdFilter())
    # On the package logger: the failing service and the app's error handler log from modules of their own.
    logger = logging.getLogger("genforge.serve")
    logger.addHandler(handler)
    try:
        with lm_server(lm) as live:
            async def broken(body, request):
                logging.getLogger("genforge.serve.service").warning("about to fail")
                raise RuntimeError("a bug")

            live.app.state.service.chat = broken
            r = httpx.post(live.v1 + "/chat/completions", headers={"x-request-id": "logged-1"},
                           json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
            assert r.status_code == 500 and r.headers["x-request-id"] == "logged-1"
    finally:
        logger.removeHandler(handler)
    lines = [(r.getMessage(), r.request_id) for r in records]
    assert ("about to fail", "logged-1") in lines
    assert any(m.startswith("internal error") and rid == "logged-1" for m, rid in lines)


def test_tracing_off_imports_no_sdk():
    code = ("import sys, genforge.serve.server, genforge.train.loop, genforge.common.tracing as t; "
            "assert not t.enabled(); print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=CHILD_ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
