"""Shadow traffic: a copy of each request goes to a candidate version, whose answer is recorded and dropped.

    genforge serve --model nano@production --shadow nano@5 --shadow-log shadow.jsonl

The copy starts as the request is handed to the version that answers it (primary or canary), as a
task of its own that the response never waits for. It runs without the application layer (no
cache writes, no retrieval: the candidate sees the request as the client sent it), non-streamed,
and at most `max_pending` copies run at once: beyond that a copy is dropped (and counted) rather
than queued, so a slow candidate can never build up a backlog that takes the serving versions' CPU
for longer than the traffic lasts. One JSON line per copy: when, which versions, the request, the
shadow's answer, its latency and tokens, and the answer the client got when it was not a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request

from genforge.serve.gate import ARRIVAL

log = logging.getLogger(__name__)
MAX_TEXT = 4000  # characters of a prompt or an answer kept in the log line


def _clip(text: Any) -> Any:
    return text[:MAX_TEXT] if isinstance(text, str) else text


def answer_texts(body: dict) -> list[str]:
    """The generated text of each choice of a chat or completions response body."""
    out = []
    for choice in body.get("choices") or []:
        message = choice.get("message")
        out.append(message.get("content") or "" if isinstance(message, dict) else choice.get("text") or "")
    return out


def _client_of(body: bytes) -> Any:
    """The ASGI `receive` of the shadow's "client": it sends `body` (the copy, as JSON: a service that
    forwards the client's raw body, such as the upstream gateway's, forwards the copy), then never leaves
    (the task is cancelled instead)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


class Shadow:
    """Mirrors requests to `served` (a versions.Served); `on_result(outcome, seconds)` feeds metrics."""

    def __init__(self, served: Any, log_path: Path, *, max_pending: int, on_result: Any = None):
        self.served, self.log_path, self.max_pending = served, Path(log_path), max_pending
        self.on_result = on_result or (lambda outcome, seconds: None)
        self.pending: set[asyncio.Task] = set()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def mirror(self, kind: str, body: Any, request_id: str, served_by: str, primary: asyncio.Future) -> None:
        """Start the copy of one request that `served_by` answers; `primary` resolves to that answer's
        texts (None for a stream)."""
        if len(self.pending) >= self.max_pending:
            self.on_result("dropped", 0.0)
            return
        task = asyncio.get_running_loop().create_task(self._run(kind, body, request_id, served_by, primary))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _run(self, kind: str, body: Any, request_id: str, served_by: str, primary: asyncio.Future) -> None:
        started = time.perf_counter()
        copy = body.model_copy(update={"stream": False, "stream_options": None})
        scope = {"type": "http", "method": "POST", "path": f"/v1/{kind}", "headers": [], "query_string": b"",
                 ARRIVAL: started}
        service = self.served.service
        self.served.in_flight += 1
        outcome, texts, usage, error = "ok", None, None, None
        try:
            handler = service.chat if kind == "chat/completions" else service.completions
            raw = copy.model_dump_json(exclude_unset=True, exclude_none=True).encode()
            response = await handler(copy, Request(scope, _client_of(raw)))
            data = json.loads(bytes(response.body))
            if response.status_code >= 400:
                outcome, error = "error", data.get("error", {}).get("message")
            else:
                texts, usage = answer_texts(data), data.get("usage")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the candidate's failure is recorded, never the primary's problem
            outcome, error = "error", getattr(e, "message", None) or type(e).__name__
        finally:
            self.served.in_flight -= 1
        seconds = time.perf_counter() - started
        self.on_result(outcome, seconds)
        primary_texts = None
        try:  # the answer the client got, when it has one by now (a stream's is not kept)
            primary_texts = await asyncio.wait_for(asyncio.shield(primary), timeout=60)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
            pass
        request = copy.model_dump(include={"messages", "prompt", "max_tokens", "max_completion_tokens",
                                           "temperature", "seed", "user"}, exclude_none=True)
        if "messages" in request:
            request["messages"] = [{**m, "content": _clip(m.get("content"))} for m in request["messages"]]
        if isinstance(request.get("prompt"), str):
            request["prompt"] = _clip(request["prompt"])
        line = {"time": time.time(), "request_id": request_id, "endpoint": kind, "shadow": self.served.ref,
                "served_by": served_by, "outcome": outcome, "seconds": round(seconds, 4),
                "request": request, "shadow_answers": [_clip(t) for t in texts] if texts is not None else None,
                "served_answers": [_clip(t) for t in primary_texts] if primary_texts is not None else None,
                "usage": usage, "error": error}
        try:
            # one short append per line (O_APPEND): replicas sharing the file never interleave lines
            await asyncio.to_thread(self._append, json.dumps(line, ensure_ascii=False) + "\n")
        except OSError as e:
            log.warning("shadow log %s cannot be written: %s", self.log_path, e)

    def _append(self, text: str) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(text)

    async def close(self) -> None:
        for task in list(self.pending):
            task.cancel()
        await asyncio.gather(*self.pending, return_exceptions=True)
