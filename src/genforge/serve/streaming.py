"""The per-token path from the engine to the socket, kept cheap.

- `Choice`: one generated sequence of a request and what its response needs.
- `event_batches`: all events of a request's choices, in batches: the choices share ONE asyncio
  wake-up (no task or queue hop per choice or per token), and whatever arrived since the last
  wake-up is handled at once, so a batch becomes one socket write.
- `ChunkEncoder`: SSE chunks written as JSON text from a per-request prefix, the token's text (one
  `json.dumps`) and a suffix - byte-for-byte what the pydantic models in protocol.py serialize to
  (tests check), without building and dumping a model per token. Chunks with logprobs (rare, and
  larger) still go through the models.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from genforge.models.generation import TokenEvent
from genforge.serve.engine import RequestStream

LogprobEntry = tuple[str, float | None, list[tuple[str, float]] | None]


class Choice:
    """One generated sequence and what the response needs from it."""

    def __init__(self, index: int, prompt_index: int, stream: RequestStream):
        self.index, self.prompt_index, self.stream = index, prompt_index, stream
        self.parts: list[str] = []
        self.logprobs: list[LogprobEntry] = []
        self.offset = 0  # characters sent so far (completions' text_offset)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.sent_first = False
        self.held, self.held_n = "", 0  # text of tokens not yet sent (stream interval)
        self.shown: list[str] = []  # the text the client was sent (after the output guard)
        self.trace: dict | None = None  # the request's span attributes while tracing (serve/tracing.py)

    def release(self, text: str, final: bool, interval: int) -> str | None:
        """The text to send now, or None to hold it: with `interval` N > 1 a stream sends one chunk
        per N tokens (the first token and the last chunk at once), so N times fewer socket writes."""
        if interval <= 1:
            return text
        self.held += text
        self.held_n += 1
        if self.sent_first and not final and self.held_n < interval:
            return None
        out, self.held, self.held_n, self.sent_first = self.held, "", 0, True
        return out

    def add(self, ev: TokenEvent, token_text: Callable[[int], str], want_logprobs: bool) -> list[LogprobEntry]:
        """Record an event; the logprob entries it adds (empty unless logprobs were asked for)."""
        self.parts.append(ev.text)
        new: list[LogprobEntry] = []
        if want_logprobs and ev.token_id is not None:
            new = [(token_text(ev.token_id), ev.logprob, ev.top_logprobs)]
            self.logprobs += new
        if ev.finish_reason is not None:
            self.finish_reason, self.error = ev.finish_reason, ev.error
        return new


class DeadlineExceeded(Exception):
    """The request's deadline (queue + generation) passed before it finished."""


async def event_batches(choices: list[Choice], deadline: float | None = None
                        ) -> AsyncIterator[list[tuple[Choice, TokenEvent]]]:
    """Batches of (choice, event) until every choice has its final event.

    `deadline` (time.monotonic) raises DeadlineExceeded when reached; the caller cancels.
    """
    wake = asyncio.Event()
    for c in choices:
        c.stream.share_wakeup(wake)
    timer = None
    if deadline is not None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), wake.set)
    pending = {c for c in choices if c.finish_reason is None}
    try:
        while pending:
            wake.clear()  # clear, then drain: a wake-up that comes after the drain is kept
            batch = []
            for c in list(pending):
                for ev in c.stream.take():
                    batch.append((c, ev))
                    if ev.finish_reason is not None:
                        pending.discard(c)
            if batch:
                yield batch
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded
            await wake.wait()
    finally:
        if timer is not None:
            timer.cancel()


def _js(text: str) -> str:
    # pydantic writes UTF-8 as is; json.dumps must not \u-escape it, or the bytes would differ
    return json.dumps(text, ensure_ascii=False)


class ChunkEncoder:
    """`data: {...}\\n\\n` events for one streamed response (see the module docstring)."""

    def __init__(self, rid: str, created: int, model: str, *, chat: bool, watermark: dict | None = None):
        """`watermark`: a watermarking deployment's description, carried by every chunk (an extension
        field, as the chunk models in protocol.py serialize it)."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.chat = chat
        self.prefix = f'data: {{"id":{_js(rid)},"object":"{obj}","created":{created},"model":{_js(model)},"choices":['
        self.mark = "" if watermark is None else f',"watermark":{json.dumps(watermark, separators=(",", ":"))}'
        self.suffix = '],"usage":null' + self.mark + '}\n\n'

    def token(self, index: int, text: str, finish_reason: str | None) -> str:
        """The chunk carrying one event's text (and finish reason) for choice `index`."""
        finish = "null" if finish_reason is None else _js(finish_reason)
        if self.chat:
            delta = f'{{"content":{_js(text)}}}' if text else "{}"
            body = f'{{"index":{index},"delta":{delta},"logprobs":null,"finish_reason":{finish}}}'
        else:
            body = f'{{"index":{index},"text":{_js(text)},"logprobs":null,"finish_reason":{finish}}}'
        return self.prefix + body + self.suffix

    def role(self, index: int, sources: list[dict] | None = None) -> str:
        """Chat streams open every choice with the assistant role, as OpenAI does; RAG's `sources`
        (an extension field) ride on that first chunk."""
        suffix = self.suffix if not sources else f'],"usage":null{self.mark},"sources":{json.dumps(sources)}}}\n\n'
        return (self.prefix + f'{{"index":{index},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                f'"finish_reason":null}}' + suffix)

    @staticmethod
    def model(chunk: Any) -> str:
        """Any chunk model (logprobs, usage) the slow way."""
        return f"data: {chunk.model_dump_json()}\n\n"
