"""The server's side of tracing (common/tracing.py sets it up): request ids and the engine's spans.

A request's id is the client's `x-request-id` when it is a safe token (letters, digits and `._:-`,
at most 128 characters), else a fresh one; the gate (serve/gate.py) returns it in every response's
headers, puts it on the request's root span and in a context variable that `RequestIdFilter` adds
to each log record, so every line the server logs while handling the request names it.

The spans of one chat request, under the root span `POST /v1/chat/completions`:

    auth, validate, prepare (guard_input, cache_lookup, retrieve), `chat MODEL` (queue_wait,
    prefill, decode: one set per choice), settle (guard_input, cache_lookup), guard_output,
    cache_put, respond

The step boundaries are the Prometheus metrics' (serve/metrics.py): the application-layer steps
time the RPC to the layer's process from the server's side; queue_wait, prefill and decode are
made from the stamps the engine takes for its metrics, after the request ends (nothing per token).
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from typing import Any

from genforge.common import tracing

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID = 128
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,%d}" % MAX_REQUEST_ID)

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("genforge_request_id", default="-")


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's x-request-id when it is safe to echo and log, else a fresh one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            value = value.strip()
            if _SAFE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (the request being handled, "-" outside one) for the formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def log_request_ids(level: int = logging.INFO) -> None:
    """Log genforge's records to stderr as `LEVEL [request id] logger: message` (genforge serve)."""
    logger = logging.getLogger("genforge")
    if any(isinstance(f, RequestIdFilter) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s:  [%(request_id)s] %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def generation_attributes(operation: str, req: Any, model: str) -> dict[str, Any]:
    """The OTel GenAI attributes of a request, known at submit time."""
    attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": "genforge",
                             "gen_ai.request.model": req.model or model, "gen_ai.response.model": model,
                             "gen_ai.request.choice.count": req.n}
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
    for key, value in (("max_tokens", max_tokens), ("temperature", req.temperature), ("top_p", req.top_p),
                       ("top_k", req.top_k), ("seed", req.seed)):
        if value is not None:
            attrs[f"gen_ai.request.{key}"] = value
    return attrs


def trace_generation(choices: list[Any], attrs: dict[str, Any]) -> None:
    """The engine's part of a request, once its sequences ended: `{operation} {model}` from the first
    submit to the last finish, and per choice queue_wait (submit -> batch slot), prefill (-> first
    token) and decode (-> finish, with the token counts)."""
    now = time.perf_counter()
    streams = [c.stream for c in choices]
    prompts = {c.prompt_index: c.stream.prompt_tokens for c in choices}  # once per prompt, as usage counts
    gen_attrs = {**attrs, "gen_ai.usage.input_tokens": sum(prompts.values()),
                 "gen_ai.usage.output_tokens": sum(s.completion_tokens for s in streams),
                 "gen_ai.response.finish_reasons": [s.finish_reason or "abort" for s in streams]}
    error = next((c.error for c in choices if c.error), None)
    gen = tracing.record_span(f"{attrs['gen_ai.operation.name']} {attrs['gen_ai.response.model']}",
                              min(s.submitted for s in streams), max(s.finished_at or now for s in streams),
                              gen_attrs, error=error)
    for c in choices:
        s = c.stream
        end = s.finished_at or now
        ids = {"genforge.choice": c.index}
        tracing.record_span("queue_wait", s.submitted, s.admitted_at or end, ids, parent=gen)
        if s.admitted_at is None:
            continue
        tracing.record_span("prefill", s.admitted_at, s.first_token_at or end,
                            {**ids, "gen_ai.usage.input_tokens": s.prompt_tokens}, parent=gen)
        if s.first_token_at is not None:
            tracing.record_span("decode", s.first_token_at, end,
                                {**ids, "gen_ai.usage.input_tokens": s.prompt_tokens,
                                 "gen_ai.usage.output_tokens": s.completion_tokens,
                                 "gen_ai.response.finish_reasons": [s.finish_reason or "abort"]},
                                parent=gen, error=c.error)
