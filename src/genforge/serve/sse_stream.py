"""The streamed (`"stream": true`) answers of /v1/completions and /v1/chat/completions: SSE text.

The service (serve/service.py) validates a request and submits its sequences; a streamed request's
response body is one of these generators over the service's choices. Everything that arrived
together goes out in one write; an engine error or the deadline ends the stream with an error event
before `[DONE]`; unfinished choices are cancelled however the stream ends (the client gone
included); a configured label is each choice's last content; the output guard filters each chunk
as it streams.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from genforge.common import tracing
from genforge.serve.gate import FIRST_TOKEN
from genforge.serve.pipeline import Prepared
from genforge.serve.protocol import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    DeltaMessage,
    UsageInfo,
    chat_logprobs,
    completion_logprobs,
    error_body,
    sse,
)
from genforge.serve.streaming import Choice, ChunkEncoder, DeadlineExceeded, event_batches

if TYPE_CHECKING:
    from genforge.serve.service import LMService


def streaming_response(gen: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


def stream_error(svc: LMService, c: Choice) -> str:
    svc.metrics.observe_error("engine" if c.stream.error_status == 500 else "overloaded")
    return sse(error_body(c.error or "generation failed", "server_error"))


async def stream_completion(svc: LMService, request: Request, req: CompletionRequest, rid: str, created: int,
                            prompts: list[list[int]], texts: list[str], choices: list[Choice],
                            filters: list[Any] | None = None, wm: Any = None) -> AsyncIterator[str]:
    want_lp = req.logprobs is not None
    mark = svc.labelling.describe(wm)

    def chunk(items: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return sse(CompletionChunk(id=rid, created=created, model=svc.shown_name(req), choices=items, usage=usage,
                                   watermark=mark))

    def with_logprobs(c: Choice, ev: Any, new: list) -> str:
        lp = completion_logprobs(new, c.offset)
        return chunk([CompletionChoice(index=c.index, text=ev.text, logprobs=lp, finish_reason=ev.finish_reason)])

    head = []
    if req.echo:
        for c in choices:
            c.offset = len(texts[c.prompt_index])
            head.append(chunk([CompletionChoice(index=c.index, text=texts[c.prompt_index])]))
    enc = ChunkEncoder(rid, created, svc.shown_name(req), chat=False, watermark=mark)
    async for text in stream_choices(svc, request, choices, enc, head, with_logprobs if want_lp else None, filters):
        yield text
    if not any(c.error for c in choices) and req.stream_options is not None and req.stream_options.include_usage:
        yield chunk([], svc.usage(prompts, choices))
    yield SSE_DONE


async def stream_choices(svc: LMService, request: Request, choices: list[Choice], enc: ChunkEncoder,
                         head: list[str], with_logprobs: Callable[[Choice, Any, list], str] | None,
                         filters: list[Any] | None) -> AsyncIterator[str]:
    """The token events of a stream, as SSE text: everything that arrived together in one write.
    Ends early on an engine error (an error event) or the deadline (an error event); unfinished
    choices are cancelled however it ends. The caller adds usage and [DONE]. A configured label is
    the last content of each choice, on the chunk that carries its finish reason."""
    started = time.perf_counter()
    label = svc.labelling.label()
    try:
        if head:
            yield "".join(head)
        async for batch in event_batches(choices, svc.deadline(request)):
            out = []
            for c, ev in batch:
                new = c.add(ev, svc.token_text, with_logprobs is not None)
                if c.error:
                    out.append(stream_error(svc, c))
                    break
                if not (ev.text or ev.finish_reason or new):
                    continue  # text held back (half a character, a possible stop string)
                if with_logprobs is not None:
                    last = label and ev.finish_reason is not None
                    out.append(with_logprobs(c, replace(ev, finish_reason=None) if last else ev, new))
                    c.offset += len(ev.text)
                    if last:
                        out.append(enc.token(c.index, label, ev.finish_reason))
                        c.offset += len(label)
                elif (text := c.release(ev.text, ev.finish_reason is not None, svc.stream_interval)) is not None:
                    if filters is not None:
                        f = filters[c.index]
                        text = f.feed(text) + (f.flush() if ev.finish_reason is not None else "")
                        if not text and ev.finish_reason is None:
                            continue  # held by the output guard until it can tell
                    if label and ev.finish_reason is not None:  # the label: a chunk of its own, the last
                        if text:
                            out.append(enc.token(c.index, text, None))
                            c.offset += len(text)
                            c.shown.append(text)
                        text = label
                    out.append(enc.token(c.index, text, ev.finish_reason))
                    c.offset += len(text)
                    c.shown.append(text)
            if out:
                if request.scope.get(FIRST_TOKEN) is None:
                    request.scope[FIRST_TOKEN] = "pending"
                yield "".join(out)  # one write for everything that arrived together
            if any(c.error for c, _ in batch):
                return
    except DeadlineExceeded:
        for c in choices:
            c.error = c.error or "deadline"
        yield sse(svc.timeout_body())
    finally:
        svc.end_choices(choices)
        if filters is not None:
            svc.app.observe_output(filters)
            # the filter ran on each chunk as it streamed: its span is the stream's
            tracing.record_span("guard_output", started, time.perf_counter(), {"genforge.streamed": True})


async def stream_chat(svc: LMService, request: Request, req: ChatCompletionRequest, rid: str, created: int,
                      prompt: list[int], choices: list[Choice], prep: Prepared | None = None, wm: Any = None
                      ) -> AsyncIterator[str]:
    mark = svc.labelling.describe(wm)
    enc = ChunkEncoder(rid, created, svc.shown_name(req), chat=True, watermark=mark)
    filters = [prep.output_filter() for _ in choices] if prep is not None else None
    if filters is not None and filters[0] is None:
        filters = None

    def chunk(items: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=svc.shown_name(req), choices=items,
                                       usage=usage, watermark=mark))

    def with_logprobs(c: Choice, ev: Any, new: list) -> str:
        delta = DeltaMessage(content=ev.text) if ev.text else DeltaMessage()
        return chunk([ChatChunkChoice(index=c.index, delta=delta, finish_reason=ev.finish_reason,
                                      logprobs=chat_logprobs(new))])

    # OpenAI opens every choice with the role; retrieved sources ride on that first chunk
    head = ["".join(enc.role(c.index, prep.sources if prep is not None else None) for c in choices)]
    async for text in stream_choices(svc, request, choices, enc, head, with_logprobs if req.logprobs else None,
                                   filters):
        yield text
    if not any(c.error for c in choices):
        usage = svc.usage([prompt], choices)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage)
        if prep is not None and not req.logprobs:
            await svc.app.remember(prep, ChatCompletionResponse(
                id=rid, created=created, model=svc.shown_name(req), usage=usage, sources=prep.sources or None,
                choices=[ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.shown)),
                                    finish_reason=c.finish_reason) for c in choices]))
    yield SSE_DONE
