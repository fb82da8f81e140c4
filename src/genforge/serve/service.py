"""/v1/completions and /v1/chat/completions: requests -> engine submissions -> OpenAI responses.

One `LMService` per app owns the engine. A request becomes one engine sequence per (prompt,
choice); n > 1 with a seed gives choice i the seed `seed + i`, so the choices differ and the
whole response is reproducible. Context limits are checked here, before anything is queued, so
"too long" is a 400 naming the field rather than a silently truncated answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from genforge.common.errors import ConfigError, GenforgeError, NotFoundError
from genforge.models.generation import TokenEvent, context_length
from genforge.models.sampling import SamplingParams
from genforge.serve.chat import render_chat, resolve_chat_template
from genforge.serve.engine import Engine, RequestStream
from genforge.serve.metrics import ServeMetrics
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
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
    _SamplingFields,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    sse,
)

# Model-default sampling values the server honours from generation_config.json when a request
# leaves them out (as vLLM does); everything else in that file is the model's business.
_DEFAULTED = ("temperature", "top_p", "top_k", "repetition_penalty")


class _Choice:
    """One generated sequence and what the response needs from it."""

    def __init__(self, index: int, prompt_index: int, stream: RequestStream):
        self.index, self.prompt_index, self.stream = index, prompt_index, stream
        self.parts: list[str] = []
        self.logprobs: list[tuple[str, float | None, list[tuple[str, float]] | None]] = []
        self.offset = 0  # characters sent so far (completions' text_offset)
        self.finish_reason: str | None = None
        self.error: str | None = None

    def add(self, ev: TokenEvent, token_text: Any, want_logprobs: bool) -> list:
        """Record an event; the logprob entries it adds (empty unless logprobs were asked for)."""
        self.parts.append(ev.text)
        new = []
        if want_logprobs and ev.token_id is not None:
            new = [(token_text(ev.token_id), ev.logprob, ev.top_logprobs)]
            self.logprobs += new
        if ev.finish_reason is not None:
            self.finish_reason, self.error = ev.finish_reason, ev.error
        return new


def _renamed(err: GenforgeError, names: dict[str, str]) -> GenforgeError:
    """The engine names SamplingParams' fields; the client should see the field it sent."""
    new = names.get(err.param or "")
    if not new or new == err.param:
        return err
    return type(err)(err.message.replace(f"{err.param}:", f"{new}:", 1), param=new, code=err.code)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class LMService:
    def __init__(self, model: Any, tokenizer: Any, *, served_name: str, max_model_len: int | None,
                 max_batch_size: int, max_queue: int, metrics: ServeMetrics,
                 compile: bool = False):
        limit = context_length(model)
        if max_model_len is not None and not 2 <= max_model_len <= limit:
            raise ConfigError(f"--max-model-len {max_model_len}: must be in [2, {limit}] "
                              f"(the model's context is {limit} tokens)", param="max_model_len")
        self.tokenizer, self.served_name, self.metrics = tokenizer, served_name, metrics
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                             max_model_len=max_model_len, observer=metrics.observer(), compile=compile)
        self.max_model_len = self.engine.max_model_len
        self.template = resolve_chat_template(tokenizer)
        gen_cfg = getattr(model, "generation_config", None)
        diff = gen_cfg.to_diff_dict() if gen_cfg is not None else {}
        self.defaults = {k: diff[k] for k in _DEFAULTED if diff.get(k) is not None}
        self._token_text: dict[int, str] = {}
        metrics.bind_engine(lambda: self.engine.num_running, lambda: self.engine.num_waiting)

    async def start(self) -> None:
        self.engine.start()

    async def shutdown(self) -> None:
        # join() blocks: off the event loop, which must keep delivering the last tokens
        await asyncio.to_thread(self.engine.shutdown, drain=True)

    def healthy(self) -> bool:
        thread = getattr(self.engine, "_thread", None)
        return thread is not None and thread.is_alive()

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    # ------------------------------------------------------------ request -> engine

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_name:
            raise NotFoundError(f"model '{model}' does not exist; this server serves '{self.served_name}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    def _room(self, prompt_len: int, max_tokens: int | None, tokens_field: str, prompt_field: str) -> int:
        """Tokens to generate: the request's max, or the rest of the context."""
        limit = self.max_model_len
        if prompt_len < 1:
            raise GenforgeError(f"{prompt_field}: the prompt is empty; give at least one token", param=prompt_field)
        if prompt_len >= limit:
            raise GenforgeError(f"{prompt_field}: the prompt has {prompt_len} tokens but the model's context is "
                                f"{limit}; shorten it to at most {limit - 1} tokens", param=prompt_field,
                                code="context_length_exceeded")
        if max_tokens is None:
            return limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise GenforgeError(f"{tokens_field}: {max_tokens} new tokens do not fit: the context is {limit} tokens "
                                f"and the prompt uses {prompt_len}; ask for at most {limit - prompt_len}",
                                param=tokens_field, code="context_length_exceeded")
        return max_tokens

    def _params(self, req: _SamplingFields, max_new: int, logprobs: int | None, i: int) -> SamplingParams:
        def pick(name: str, fallback: Any) -> Any:
            value = getattr(req, name)
            return value if value is not None else self.defaults.get(name, fallback)

        top_k = pick("top_k", None)
        return SamplingParams(
            max_new_tokens=max_new, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=top_k if top_k is not None and top_k > 0 else None,
            repetition_penalty=pick("repetition_penalty", 1.0), presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            seed=None if req.seed is None else req.seed + i, logprobs=logprobs)

    def _submit(self, prompts: list[list[int]], req: _SamplingFields, max_tokens: int | None,
                logprobs: int | None, names: dict[str, str]) -> list[_Choice]:
        """Check every prompt first, then queue all sequences; all or none are queued."""
        tokens_field, prompt_field = names.get("max_tokens", "max_tokens"), names.get("prompt", "prompt")
        rooms = [self._room(len(ids), max_tokens, tokens_field, prompt_field) for ids in prompts]
        choices: list[_Choice] = []
        try:
            for p, (ids, room) in enumerate(zip(prompts, rooms)):
                for i in range(req.n):
                    stream = self.engine.submit(ids, self._params(req, room, logprobs, i))
                    choices.append(_Choice(p * req.n + i, p, stream))
        except GenforgeError as e:
            for c in choices:
                c.stream.cancel()
            raise _renamed(e, names) from None
        for ids in prompts:
            self.metrics.observe_prompt(len(ids))
        return choices

    async def _events(self, choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, TokenEvent]]:
        """Events of all choices as they come (one queue, one pump task per choice)."""
        if len(choices) == 1:
            async for ev in choices[0].stream:
                yield choices[0], ev
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                async for ev in c.stream:
                    await queue.put((c, ev))
            except Exception as e:  # re-raised in the consumer, not lost in a task
                queue.put_nowait((c, e))
            finally:
                queue.put_nowait((c, None))

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining = len(choices)
            while remaining:
                c, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield c, item
        finally:
            for t in tasks:
                t.cancel()

    @staticmethod
    def _cancel_unfinished(choices: list[_Choice]) -> None:
        for c in choices:
            if c.finish_reason is None:
                c.stream.cancel()

    async def _collect(self, request: Request, choices: list[_Choice], want_logprobs: bool) -> bool:
        """Run all choices to the end; False if the client went away first (all cancelled)."""

        async def consume() -> None:
            async for c, ev in self._events(choices):
                c.add(ev, self.token_text, want_logprobs)

        work = asyncio.create_task(consume())
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                work.result()
                return True
            return False
        finally:
            work.cancel()
            gone.cancel()
            self._cancel_unfinished(choices)

    @staticmethod
    def _usage(prompts: list[list[int]], choices: list[_Choice]) -> UsageInfo:
        prompt = sum(len(p) for p in prompts)  # once per prompt, however many choices share it
        completion = sum(c.stream.completion_tokens for c in choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @staticmethod
    def _engine_failure(choices: list[_Choice]) -> JSONResponse | None:
        for c in choices:
            if c.error:  # the engine failed mid-request: our fault, not the client's
                return JSONResponse(error_body(c.error, "server_error"), status_code=500)
        return None

    @staticmethod
    def _streaming(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ /v1/completions

    def _completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        raw = req.prompt
        items: list = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items:
            raise GenforgeError("prompt: the list is empty; give a string or token ids", param="prompt")
        ids = [list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in items]
        texts = [p if isinstance(p, str) else (self.tokenizer.decode(p) if req.echo else "") for p in items]
        return ids, texts

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        prompts, texts = self._completion_prompts(req)
        want_lp = req.logprobs is not None
        choices = self._submit(prompts, req, req.max_tokens, req.logprobs, {"prompt": "prompt"})
        rid, created = new_id("cmpl"), now()
        if req.stream:
            return self._streaming(self._stream_completion(req, rid, created, prompts, texts, choices))
        if not await self._collect(request, choices, want_lp):
            return Response(status_code=499)
        if (failure := self._engine_failure(choices)) is not None:
            return failure
        out = []
        for c in choices:
            head = texts[c.prompt_index] if req.echo else ""
            lp = completion_logprobs(c.logprobs, len(head)) if want_lp else None
            out.append(CompletionChoice(index=c.index, text=head + "".join(c.parts), logprobs=lp,
                                        finish_reason=c.finish_reason))
        return JSONResponse(CompletionResponse(id=rid, created=created, model=self.served_name, choices=out,
                                               usage=self._usage(prompts, choices)).model_dump())

    async def _stream_completion(self, req: CompletionRequest, rid: str, created: int, prompts: list[list[int]],
                                 texts: list[str], choices: list[_Choice]) -> AsyncIterator[str]:
        want_lp = req.logprobs is not None

        def chunk(items: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return sse(CompletionChunk(id=rid, created=created, model=self.served_name, choices=items, usage=usage))

        try:
            if req.echo:
                for c in choices:
                    c.offset = len(texts[c.prompt_index])
                    yield chunk([CompletionChoice(index=c.index, text=texts[c.prompt_index])])
            async for c, ev in self._events(choices):
                new = c.add(ev, self.token_text, want_lp)
                if c.error:
                    yield sse(error_body(c.error, "server_error"))
                    break
                if not (ev.text or ev.finish_reason or new):
                    continue  # text held back (half a character, a possible stop string)
                lp = completion_logprobs(new, c.offset) if want_lp else None
                c.offset += len(ev.text)
                yield chunk([CompletionChoice(index=c.index, text=ev.text, logprobs=lp,
                                              finish_reason=ev.finish_reason)])
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield chunk([], self._usage(prompts, choices))
            yield SSE_DONE
        finally:
            self._cancel_unfinished(choices)

    # ------------------------------------------------------------ /v1/chat/completions

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise GenforgeError("top_logprobs: set logprobs to true to use top_logprobs", param="top_logprobs")
        prompt = render_chat(self.tokenizer, self.template, req.messages,
                             add_generation_prompt=req.add_generation_prompt, template_kwargs=req.chat_template_kwargs)
        tokens_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        names = {"prompt": "messages", "max_tokens": tokens_field, "logprobs": "top_logprobs"}
        choices = self._submit([prompt], req, max_tokens, logprobs, names)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            return self._streaming(self._stream_chat(req, rid, created, prompt, choices))
        if not await self._collect(request, choices, req.logprobs):
            return Response(status_code=499)
        if (failure := self._engine_failure(choices)) is not None:
            return failure
        out = [ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.parts)),
                          logprobs=chat_logprobs(c.logprobs) if req.logprobs else None,
                          finish_reason=c.finish_reason) for c in choices]
        return JSONResponse(ChatCompletionResponse(id=rid, created=created, model=self.served_name, choices=out,
                                                   usage=self._usage([prompt], choices)).model_dump())

    async def _stream_chat(self, req: ChatCompletionRequest, rid: str, created: int, prompt: list[int],
                           choices: list[_Choice]) -> AsyncIterator[str]:
        def chunk(items: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=self.served_name, choices=items,
                                           usage=usage))

        try:
            for c in choices:  # OpenAI opens every choice with the role
                yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
            async for c, ev in self._events(choices):
                new = c.add(ev, self.token_text, req.logprobs)
                if c.error:
                    yield sse(error_body(c.error, "server_error"))
                    break
                if not (ev.text or ev.finish_reason or new):
                    continue
                delta = DeltaMessage(content=ev.text) if ev.text else DeltaMessage()
                yield chunk([ChatChunkChoice(index=c.index, delta=delta, finish_reason=ev.finish_reason,
                                             logprobs=chat_logprobs(new) if req.logprobs else None)])
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield chunk([], self._usage([prompt], choices))
            yield SSE_DONE
        finally:
            self._cancel_unfinished(choices)
