"""/v1/completions and /v1/chat/completions: requests -> engine submissions -> OpenAI responses.

One `LMService` per app owns the engine. A request becomes one engine sequence per (prompt,
choice), queued all together or not at all; n > 1 with a seed gives choice i the seed `seed + i`
(wrapped to 64 bits), so the choices differ and the whole response is reproducible. Context
limits are checked here, before anything is queued, so "too long" is a 400 naming the field
rather than a silently truncated answer.

Time: every request has a deadline (`request_timeout`, from its arrival, covering the queue and
the generation); when it passes, its sequences are cancelled (leaving the queue at once) and the
client gets 504 with code `request_timeout` - in a stream, as an error event before `[DONE]`.
Tokenizing and template rendering of large inputs run in a worker thread, so one big prompt does
not stall every other stream on the event loop. A streamed answer's body is written by
serve/sse_stream.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from genforge.common import tracing
from genforge.common.errors import ConfigError, GenforgeError, NotFoundError
from genforge.models.generation import context_length
from genforge.models.sampling import SamplingParams, check_prompt_length
from genforge.serve.adapters import AdapterRegistry
from genforge.serve.chat import render_chat, resolve_chat_template
from genforge.serve.engine import Engine, decode_options
from genforge.serve.gate import ARRIVAL, ERROR_KIND, FIRST_TOKEN
from genforge.serve.labelling import Labelling
from genforge.serve.metrics import ServeMetrics
from genforge.serve.pipeline import AppLayer, replay_chat
from genforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    _SamplingFields,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
)
from genforge.serve.sse_stream import stream_chat, stream_completion, streaming_response
from genforge.serve.streaming import Choice, DeadlineExceeded, event_batches
from genforge.serve.structured import GrammarCache
from genforge.serve.tracing import generation_attributes, trace_generation

# Model-default sampling values the server honours from generation_config.json when a request
# leaves them out (as vLLM does); everything else in that file is the model's business.
_DEFAULTED = ("temperature", "top_p", "top_k", "repetition_penalty")


# Tokens kept free for the answer when retrieved sources are fitted into a request without max_tokens.
RAG_ANSWER_RESERVE = 64

# Inputs longer than this (characters) are tokenized / rendered in a worker thread: below it the
# thread hop costs more than the work.
OFFLOAD_CHARS = 4096


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
                 max_batch_size: int, max_queue: int, metrics: ServeMetrics, decode: str = "eager",
                 request_timeout: float | None = None, kv_cache_bytes: int | None = None,
                 aliases: tuple[str, ...] = (), stream_interval: int = 1, app_layer: AppLayer | None = None,
                 adapters: AdapterRegistry | None = None, labelling: Labelling | None = None):
        """`aliases`: other names a request's `model` may use (e.g. the path it was started with).
        `stream_interval`: tokens per streamed chunk (1: every token; vLLM's option of that name).
        `app_layer`: the guard / semantic cache / RAG steps of chat requests (serve/pipeline.py).
        `adapters`: LoRA adapters over this model, each picked by its name in a request's `model`.
        `labelling`: the watermark and label text of a labelling deployment (serve/labelling.py)."""
        limit = context_length(model)
        if max_model_len is not None and not 2 <= max_model_len <= limit:
            raise ConfigError(f"--max-model-len {max_model_len}: must be in [2, {limit}] "
                              f"(the model's context is {limit} tokens)", param="max_model_len")
        if request_timeout is not None and request_timeout <= 0:
            raise ConfigError(f"--request-timeout {request_timeout}: must be > 0 seconds", param="request_timeout")
        self.tokenizer, self.served_name, self.metrics = tokenizer, served_name, metrics
        self.names = {served_name, *aliases}
        self.request_timeout = request_timeout
        if stream_interval < 1:
            raise ConfigError(f"--stream-interval {stream_interval}: must be at least 1", param="stream_interval")
        self.stream_interval = stream_interval
        self.app = app_layer
        self.labelling = labelling or Labelling()
        if app_layer is not None:
            app_layer.labelling = self.labelling  # the cache key keeps keys and labels apart
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                             max_model_len=max_model_len, observer=metrics.observer(),
                             kv_cache_bytes=kv_cache_bytes, adapters=adapters, **decode_options(decode))
        self.adapters = adapters
        if adapters is not None:
            metrics.bind_adapters(adapters)
        self.decode = decode
        self.max_model_len = self.engine.max_model_len
        self.template = resolve_chat_template(tokenizer)
        gen_cfg = getattr(model, "generation_config", None)
        diff = gen_cfg.to_diff_dict() if gen_cfg is not None else {}
        self.defaults = {k: diff[k] for k in _DEFAULTED if diff.get(k) is not None}
        if app_layer is not None:
            app_layer.default_temperature = float(self.defaults.get("temperature", 1.0))
        self._token_text: dict[int, str] = {}
        # response_format -> compiled grammar, compiled in a worker thread and kept by schema
        self.grammars = GrammarCache(tokenizer, self.engine.gen.vocab_size, self.engine.gen.eos_ids)
        metrics.bind_engine(lambda: self.engine.num_running, lambda: self.engine.num_waiting,
                            self.engine.kv_cache_usage)

    async def start(self) -> None:
        self.engine.start()

    async def shutdown(self, timeout: float | None = None) -> None:
        # join() blocks: off the event loop, which must keep delivering the last tokens
        await asyncio.to_thread(self.engine.shutdown, drain=True, timeout=timeout)

    def in_effect(self) -> dict:
        """What actually runs (not what was asked): for the start-up line and benchmarks' records."""
        import torch

        runner = self.engine.gen.runner
        param = next(self.engine.model.parameters(), None)
        return {"decode": self.decode, "fast_path": self.engine.gen.fast_path,
                "batched": self.engine.gen.batched, "runner": type(runner).__name__,
                "prepacked": bool(getattr(runner, "prepacked", False)),
                "compiled": bool(getattr(runner, "compiled", False)),
                "dtype": str(getattr(runner, "dtype", None) or (param.dtype if param is not None else None)),
                "device": str(self.engine.gen.device), "torch_threads": torch.get_num_threads(),
                "max_batch_size": self.engine.max_batch_size, "max_model_len": self.max_model_len}

    def healthy(self) -> bool:
        return self.engine.healthy

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    # ------------------------------------------------------------ request -> engine

    def _adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 model_not_found for other names."""
        if model is None or model in self.names:
            return None
        if self.adapters is not None and model in self.adapters.infos:
            return model
        served = ", ".join(f"'{n}'" for n in [self.served_name, *(self.adapters.names if self.adapters else [])])
        raise NotFoundError(f"model '{model}' does not exist; this server serves {served} "
                            f"(see GET /v1/models)", param="model", code="model_not_found")

    def _check_model(self, model: str | None) -> None:
        self._adapter_of(model)

    def shown_name(self, req: _SamplingFields) -> str:
        """The `model` a response names: the adapter asked for, else the served base name."""
        return self._adapter_of(getattr(req, "model", None)) or self.served_name

    def deadline(self, request: Request) -> float | None:
        """time.monotonic() by which the request must be done (counted from its arrival)."""
        if self.request_timeout is None:
            return None
        arrival = request.scope.get(ARRIVAL)
        waited = time.perf_counter() - arrival if arrival is not None else 0.0
        return time.monotonic() - waited + self.request_timeout

    def timeout_body(self) -> dict:
        return error_body(f"the request did not finish within the server's request timeout of "
                          f"{self.request_timeout:g} s (queue + generation); ask for fewer tokens or retry "
                          f"when the server is less busy", "timeout_error", code="request_timeout")

    @staticmethod
    async def _offload(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if size < OFFLOAD_CHARS:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def _room(self, prompt_len: int, max_tokens: int | None, tokens_field: str, prompt_field: str) -> int:
        """Tokens to generate: the request's max, or the rest of the context."""
        return check_prompt_length(prompt_len, max_tokens, self.max_model_len, prompt_field=prompt_field,
                                   tokens_field=tokens_field)

    def _params(self, req: _SamplingFields, max_new: int, logprobs: int | None, i: int,
                grammar: Any = None, watermark: Any = None) -> SamplingParams:
        def pick(name: str, fallback: Any) -> Any:
            value = getattr(req, name)
            return value if value is not None else self.defaults.get(name, fallback)

        top_k = pick("top_k", None)
        # seed + i wrapped to 64 bits (seed may be 2**64 - 1); a negative seed maps to its unsigned
        # twin, as torch.Generator.manual_seed does
        seed = None if req.seed is None else (req.seed + i) % 2**64
        return SamplingParams(
            max_new_tokens=max_new, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=top_k if top_k is not None and top_k > 0 else None,
            repetition_penalty=pick("repetition_penalty", 1.0), presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            seed=seed, logprobs=logprobs, grammar=grammar, watermark=watermark)

    def _submit(self, prompts: list[list[int]], req: _SamplingFields, max_tokens: int | None,
                logprobs: int | None, names: dict[str, str], grammar: Any = None, watermark: Any = None
                ) -> list[Choice]:
        """Check every prompt first, then queue all sequences: all or none are queued. `grammar`:
        the compiled response_format (each sequence gets its own matcher of it); `watermark`: the
        request's TextWatermark (serve/labelling.py)."""
        tokens_field, prompt_field = names.get("max_tokens", "max_tokens"), names.get("prompt", "prompt")
        rooms = [self._room(len(ids), max_tokens, tokens_field, prompt_field) for ids in prompts]
        items = [(ids, self._params(req, room, logprobs, i, grammar, watermark)) for ids, room in zip(prompts, rooms)
                 for i in range(req.n)]
        adapter = self._adapter_of(getattr(req, "model", None))
        try:
            streams = self.engine.submit_many(items, adapter=adapter)
        except GenforgeError as e:
            raise _renamed(e, names) from None
        if self.adapters is not None:
            self.metrics.observe_adapter_request(adapter or self.served_name)
        for ids in prompts:
            self.metrics.observe_prompt(len(ids))
        choices = [Choice(k, k // req.n, stream) for k, stream in enumerate(streams)]
        if tracing.enabled():
            attrs = generation_attributes("chat" if prompt_field == "messages" else "text_completion", req,
                                          self.shown_name(req))
            choices[0].trace = attrs
        return choices

    @staticmethod
    def end_choices(choices: list[Choice]) -> None:
        """The request is done with its sequences: cancel the unfinished ones, trace the engine's part."""
        for c in choices:
            if c.finish_reason is None:
                c.stream.cancel()
        if choices and choices[0].trace is not None:
            attrs, choices[0].trace = choices[0].trace, None  # once, whichever path ends the request
            trace_generation(choices, attrs)

    async def _collect(self, request: Request, choices: list[Choice], want_logprobs: bool) -> Response | None:
        """Run all choices to the end: None when done, else the response to give (client gone,
        deadline passed). Unfinished choices are cancelled either way."""
        deadline = self.deadline(request)

        async def consume() -> None:
            async for batch in event_batches(choices, deadline):
                for c, ev in batch:
                    c.add(ev, self.token_text, want_logprobs)

        work = asyncio.create_task(consume())
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                return Response(status_code=499)
            try:
                work.result()
            except DeadlineExceeded:
                return JSONResponse(self.timeout_body(), status_code=504)
            return None
        finally:
            work.cancel()
            gone.cancel()
            self.end_choices(choices)

    @staticmethod
    def usage(prompts: list[list[int]], choices: list[Choice]) -> UsageInfo:
        prompt = sum(len(p) for p in prompts)  # once per prompt, however many choices share it
        completion = sum(c.stream.completion_tokens for c in choices)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _engine_failure(self, request: Request, choices: list[Choice]) -> JSONResponse | None:
        for c in choices:
            if c.error:  # the engine failed (500) or shut down (503): the text is generic, with an id
                status = c.stream.error_status
                if status == 500:
                    request.scope[ERROR_KIND] = "engine"
                headers = {"Retry-After": "1"} if status == 503 else None
                kind = "server_error" if status == 500 else "server_overloaded"
                return JSONResponse(error_body(c.error, kind), status_code=status, headers=headers)
        return None

    @staticmethod
    def _json(request: Request, body: Any, choices: list[Choice], headers: dict[str, str] | None = None
              ) -> JSONResponse:
        if any(c.stream.completion_tokens for c in choices):
            request.scope[FIRST_TOKEN] = "pending"  # the client sees its first token with this write
        return JSONResponse(body.model_dump(), headers=headers)

    # ------------------------------------------------------------ /v1/completions

    @staticmethod
    def _raw_prompts(req: CompletionRequest) -> list:
        raw = req.prompt
        return [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)

    def _completion_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        items = self._raw_prompts(req)
        if not items:
            raise GenforgeError("prompt: the list is empty; give a string or token ids", param="prompt")
        ids = [list(self.tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in items]
        vocab = self.engine.gen.vocab_size
        for p in items:  # checked before `echo` decodes them (a negative id overflows the tokenizer)
            if not isinstance(p, str) and (bad := next((t for t in p if not 0 <= t < vocab), None)) is not None:
                raise GenforgeError(f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                                    param="prompt")
        texts = [p if isinstance(p, str) else (self.tokenizer.decode(p) if req.echo else "") for p in items]
        return ids, texts

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        grammar = await self.grammars.get(req.response_format)  # a bad schema is a 400 before any work
        wm = self.labelling.for_request(req)
        raw = req.prompt
        size = len(raw) if isinstance(raw, str) else sum(len(p) if isinstance(p, (str, list)) else 1 for p in raw)
        prompts, texts = await self._offload(size, self._completion_prompts, req)
        want_lp = req.logprobs is not None
        guard = self.app.guard if self.app is not None else None
        placeholders = None
        if guard is not None:  # the guard covers every model call, not only chat
            if want_lp and guard.policy != "log":
                raise GenforgeError("logprobs: not available while the output guard filters responses (its "
                                    "tokens would show what the filter removed)", param="logprobs")
            prompts, placeholders = await self.app.guard_prompts(
                prompts, [t if isinstance(p, str) else None for t, p in zip(texts, self._raw_prompts(req))],
                self.tokenizer)
        choices = self._submit(prompts, req, req.max_tokens, req.logprobs, {"prompt": "prompt"}, grammar, wm)
        rid, created = new_id("cmpl"), now()
        filters = [guard.output_filter(placeholders) for _ in choices] if guard is not None else None
        if req.stream:
            stream = stream_completion(self, request, req, rid, created, prompts, texts, choices, filters, wm)
            return streaming_response(stream, self.labelling.headers(wm))
        if (early := await self._collect(request, choices, want_lp)) is not None:
            return early
        if (failure := self._engine_failure(request, choices)) is not None:
            return failure
        generated = ["".join(c.parts) for c in choices]
        if filters is not None:
            with tracing.span("guard_output"):
                generated = [f.feed(text) + f.flush() for f, text in zip(filters, generated)]
                self.app.observe_output(filters)
        out = []
        generated = [text + self.labelling.label() for text in generated]
        for c, text in zip(choices, generated):
            head = texts[c.prompt_index] if req.echo else ""
            lp = completion_logprobs(c.logprobs, len(head)) if want_lp else None
            out.append(CompletionChoice(index=c.index, text=head + text, logprobs=lp, finish_reason=c.finish_reason))
        return self._json(request, CompletionResponse(id=rid, created=created, model=self.shown_name(req), choices=out,
                                                      usage=self.usage(prompts, choices),
                                                      watermark=self.labelling.describe(wm)),
                          choices, self.labelling.headers(wm))

    # ------------------------------------------------------------ /v1/chat/completions

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise GenforgeError("top_logprobs: set logprobs to true to use top_logprobs", param="top_logprobs")
        grammar = await self.grammars.get(req.response_format)  # a bad schema is a 400 before any work
        wm = self.labelling.for_request(req)
        marked = self.labelling.headers(wm)
        prep = None
        messages = req.messages
        if self.app is not None and self.app.active:
            if req.logprobs and self.app.guard is not None and self.app.guard.policy != "log":
                raise GenforgeError("logprobs: not available while the output guard filters responses (its "
                                    "tokens would show what the filter removed)", param="logprobs")
            reserve = req.max_completion_tokens or req.max_tokens or RAG_ANSWER_RESERVE

            def fits(msgs: list[dict]) -> bool:
                ids = render_chat(self.tokenizer, self.template, [ChatMessage(**m) for m in msgs],
                                  add_generation_prompt=req.add_generation_prompt,
                                  template_kwargs=req.chat_template_kwargs)
                return len(ids) + reserve <= self.max_model_len

            prep = await self.app.prepare(req, fits, speculate=True)
            if prep.hit is not None:
                return replay_chat(prep, req, self.shown_name(req), request, self.labelling.describe(wm), marked)
            messages = [ChatMessage(**m) for m in prep.messages]
        size = sum(len(m.text()) for m in messages)
        prompt = await self._offload(size, render_chat, self.tokenizer, self.template, messages,
                                     add_generation_prompt=req.add_generation_prompt,
                                     template_kwargs=req.chat_template_kwargs)
        tokens_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        names = {"prompt": "messages", "max_tokens": tokens_field, "logprobs": "top_logprobs"}
        choices = self._submit([prompt], req, max_tokens, logprobs, names, grammar, wm)
        if prep is not None:
            # The engine has started on the prompt; nothing reaches the client before the layer's last
            # checks (injection detector, near cache matches) have passed.
            try:
                await self.app.settle(prep)
            except BaseException:
                self.end_choices(choices)
                raise
            if prep.hit is not None:
                self.end_choices(choices)
                return replay_chat(prep, req, self.shown_name(req), request, self.labelling.describe(wm), marked)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            return streaming_response(stream_chat(self, request, req, rid, created, prompt, choices, prep, wm),
                                      {**(prep.headers() if prep is not None else {}), **marked})
        if (early := await self._collect(request, choices, req.logprobs)) is not None:
            return early
        if (failure := self._engine_failure(request, choices)) is not None:
            return failure
        texts = ["".join(c.parts) for c in choices]
        if prep is not None and (filters := [prep.output_filter() for _ in choices])[0] is not None:
            with tracing.span("guard_output"):
                texts = [f.feed(t) + f.flush() for f, t in zip(filters, texts)]
                self.app.observe_output(filters)
        texts = [t + self.labelling.label() for t in texts]
        out = [ChatChoice(index=c.index, message=AssistantMessage(content=text),
                          logprobs=chat_logprobs(c.logprobs) if req.logprobs else None,
                          finish_reason=c.finish_reason) for c, text in zip(choices, texts)]
        body = ChatCompletionResponse(id=rid, created=created, model=self.shown_name(req), choices=out,
                                      usage=self.usage([prompt], choices),
                                      sources=prep.sources if prep is not None and prep.sources else None,
                                      watermark=self.labelling.describe(wm))
        if prep is not None:
            await self.app.remember(prep, body)
        return self._json(request, body, choices, {**(prep.headers() if prep is not None else {}), **marked})
