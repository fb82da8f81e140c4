"""The application-layer steps of a chat request, in the order ../ARCHITECTURE.md gives:

    guard(input) -> semantic cache -> retrieve (RAG) -> engine -> guard(output) -> cache put

`AppLayer.prepare` runs the steps before the engine and returns a `Prepared` request: the messages
the engine sees (redacted, with the retrieved sources), the cache decision and, on a hit, the
stored answer. The service (serve/service.py) runs the engine, passes the text through
`Prepared.output_filter()` and hands the finished answer back to `AppLayer.remember`. Each step
is off unless the deployment's config turns it on; with all of them off `prepare` does nothing
and the request takes the plain path.

The blocking steps (embedding, the store, the verifier, the guard's regexes over long inputs) run
in a process of their own by default (serve/layer_steps.py says why), called through
`AppLayer.steps`; the event loop keeps streaming other requests' tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from genforge.common import tracing
from genforge.common.errors import NotFoundError
from genforge.common.store import StoreUnavailable
from genforge.data.retriever import with_sources
from genforge.serve.app_config import AppConfig
from genforge.serve.metrics import ServeMetrics
from genforge.serve.protocol import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    UsageInfo,
    new_id,
    now,
    sse,
)
from genforge.serve.streaming import ChunkEncoder

WORKER_THREADS = 64  # mostly waiting (on the embedding batch, the store), so cheap; see the module doc
INLINE_CHARS = 8192  # the guard's rules over a turn shorter than this run on the event loop (~0.1 ms)
log = logging.getLogger(__name__)


@dataclass
class Prepared:
    messages: list[dict]                       # what the engine sees
    cache: str = "off"                         # off | hit | miss | bypass | pending (until settled)
    key: str | None = None                     # the exact part of the cache key
    turn: str | None = None                    # the current user turn (the similar part)
    hit: Any = None                            # serve.cache.CacheHit on a hit
    sources: list[dict] = field(default_factory=list)
    guard: Any = None                          # serve.guard.GuardResult of the input
    _layer: AppLayer | None = None

    def headers(self) -> dict[str, str]:
        out = {}
        if self.guard is not None and self.guard.action in ("redacted", "logged"):
            # The client sees that its input was changed (or flagged); sent before any token, so input only.
            out["x-genforge-guard"] = self.guard.action
            out["x-genforge-guard-reason"] = guard_reason(self.guard)
        if self.cache == "off":
            return out
        out["x-genforge-cache"] = self.cache
        if self.key is not None:
            out["x-genforge-cache-key"] = self.key  # what DELETE /v1/cache?key= takes
        if self.hit is not None:
            out["x-genforge-cache-similarity"] = f"{self.hit.similarity:.4f}"
        return out

    def output_filter(self) -> Any:
        """A StreamFilter for one choice's text, or None when no output guard runs."""
        layer = self._layer
        if layer is None or layer.guard is None:
            return None
        return layer.guard.output_filter(self.guard.placeholders if self.guard is not None else None)


def guard_reason(result: Any) -> str:
    """A guard result's findings in a few words for a header: "PII: EMAIL, PHONE", "prompt injection"."""
    parts = ["prompt injection"] if result.injection else []
    types = sorted({span.type for span in result.pii})
    if types:
        parts.append("PII: " + ", ".join(types))
    return "; ".join(parts) or "flagged"


class AppLayer:
    """The configured steps of one server, in front of its engine. `steps` runs the blocking ones
    (serve/layer_steps.py: `LayerProcess` or `LocalSteps`); the guard's output filter runs here, on
    the text as it streams."""

    def __init__(self, config: AppConfig, *, steps: Any, metrics: ServeMetrics, served_name: str,
                 model_version: str):
        self.config, self.metrics, self.steps = config, metrics, steps
        self.served_name, self.model_version = served_name, model_version
        self.default_temperature = 1.0  # the model's generation_config default, set by the service
        self.labelling: Any = None  # serve.labelling.Labelling, set by the service (part of the cache key)
        self.info = steps.wait_ready()
        self.guard = None
        if config.guard.policy != "off":
            from genforge.serve.guard import Guard

            g = config.guard  # no embedder: this copy filters output; the steps' copy judges input
            self.guard = Guard(g.policy, injection_threshold=g.injection_threshold, allowlist=g.allowlist,
                               banned=g.banned)
        self.cache_on = config.cache.enabled
        self.rag_on = config.rag.index is not None

    @property
    def active(self) -> bool:
        return self.guard is not None or self.cache_on or self.rag_on

    def describe(self) -> str:
        parts = []
        if self.guard is not None:
            parts.append(f"guard={self.config.guard.policy}")
        if self.cache_on:
            parts.append(f"cache=on(threshold {self.config.cache.threshold:g}, verify {self.config.cache.verify})")
        if self.rag_on:
            parts.append(f"rag={self.config.rag.index}(k {self.config.rag.k})")
        if self.info.get("store"):
            parts.append(f"store={self.info['store']}")
        parts.append("in its own process" if self.config.own_process else "in the server's process")
        return " ".join(parts)

    def close(self) -> None:
        self.steps.close()

    @staticmethod
    async def _offload(fn: Callable[..., Any], messages: list[dict], **kw: Any) -> Any:
        """`fn(messages)` here, or in a thread when the text is long enough for regexes to hold the loop."""
        if sum(len(_text(m.get("content"))) for m in messages) < INLINE_CHARS:
            return fn(messages, **kw)
        return await asyncio.to_thread(functools.partial(fn, messages, **kw))

    @contextlib.contextmanager
    def _step(self, step: str, *, count_failures: bool = True) -> Iterator[None]:
        """One step: its latency metric (also when it fails, unless `count_failures` is off) and its span."""
        started = time.perf_counter()
        with tracing.span(step):
            try:
                yield
            except BaseException:
                if count_failures:
                    self._observe(step, started)
                raise
        self._observe(step, started)

    def _observe(self, step: str, started: float) -> None:
        self.metrics.step_latency.labels(self.served_name, step).observe(time.perf_counter() - started)

    # ------------------------------------------------------------ before the engine

    async def prepare(self, req: ChatCompletionRequest, fits: Callable[[list[dict]], bool] | None = None, *,
                      speculate: bool = False) -> Prepared:
        """`fits(messages)`: whether the rendered messages leave room for the answer in the context.

        `speculate`: when the engine's prompt does not depend on the slow steps (no retrieval), run only
        the cheap ones here, in this process (the guard's rules and PII redaction, the cache key), and
        leave the others (the injection detector, the cache lookup) to `settle`, which the caller awaits
        after it has started the engine on `messages`. The answer is the same; the engine does not wait
        for the layer's process (at 16 clients its two calls here took ~18 ms a request, its
        embedding ones ~150 ms)."""
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        out = Prepared(messages=messages, _layer=self)
        if not self.active:
            return out
        with self._step("prepare"):  # everything the layer does before the engine may start
            return await self._prepare(req, out, fits, speculate)

    async def _prepare(self, req: ChatCompletionRequest, out: Prepared, fits: Callable[[list[dict]], bool] | None,
                       speculate: bool) -> Prepared:
        messages = out.messages
        defer = speculate and not self.rag_on
        if self.guard is not None:
            try:
                with self._step("guard_input"):
                    if defer:  # the rules and PII here (no embedding): the detector's part is left to settle
                        result = replace(await self._offload(self.guard.check_input, messages, detector=False),
                                         detector_pending=True)
                    else:
                        result = await self.steps.call("check_input", messages, None, True)
            except Exception:
                self.metrics.guard_actions.labels(self.served_name, "input", "blocked").inc()
                raise
            out.guard, out.messages = result, result.redacted
            if result.action != "allowed":
                self.metrics.guard_actions.labels(self.served_name, "input", result.action).inc()
        if self.cache_on:
            await self._cache_key_of(req, out)
            if out.cache == "pending" and not defer:
                await self._lookup(out)
            if out.hit is not None:
                return out
        if self.rag_on:
            await self._retrieve(out, fits)
        return out

    async def settle(self, prep: Prepared) -> None:
        """The steps `prepare(speculate=True)` left: the injection detector (raises ContentFilteredError
        when the policy refuses) and the cache lookup (sets `prep.hit`), side by side: both embed the
        same turn, which the shared embedder forwards once."""
        guard = prep.guard is not None and prep.guard.detector_pending
        if not guard and prep.cache != "pending":
            return
        with self._step("settle", count_failures=False):
            judged = asyncio.ensure_future(self._finish_guard(prep)) if guard else None
            try:
                if prep.cache == "pending":
                    await self._lookup(prep)
                    if prep.hit is not None and prep.hit.exact and judged is not None:
                        # The same text under the same key passed the detector when its answer was stored.
                        if judged.done() and not judged.cancelled():
                            judged.exception()  # retrieved: a verdict no longer needed is not a logged error
                        judged.cancel()
                        judged = None
                if judged is not None:
                    await judged
            finally:
                if judged is not None and not judged.done():
                    judged.cancel()

    async def _finish_guard(self, prep: Prepared) -> None:
        logged = prep.guard.action == "logged"
        try:
            with self._step("guard_input"):
                prep.guard = await self.steps.call("finish_input", prep.guard)
        except Exception:
            self.metrics.guard_actions.labels(self.served_name, "input", "blocked").inc()
            raise
        if prep.guard.action == "logged" and not logged:
            self.metrics.guard_actions.labels(self.served_name, "input", "logged").inc()

    async def guard_prompts(self, prompts: list[list[int]], texts: list[str | None], tokenizer: Any
                            ) -> tuple[list[list[int]], Any]:
        """/v1/completions: judge each prompt (token-id prompts by their decoded text); a redacted
        prompt is tokenized again. Returns the prompts the engine sees and the placeholders (shared
        with the output filter, so a value keeps its number in the answer)."""
        decoded = [tokenizer.decode(ids) if text is None else text for ids, text in zip(prompts, texts)]
        redacted, placeholders = await self.guard_texts(decoded)
        return [list(tokenizer(r)["input_ids"]) if r is not None else ids for ids, r in zip(prompts, redacted)], \
            placeholders

    async def guard_texts(self, texts: list[str]) -> tuple[list[str | None], Any]:
        """Judge each completion prompt's text (raises ContentFilteredError when the policy blocks one).
        Returns each prompt's redacted text (None: unchanged) and the placeholders the redactions used."""
        from genforge.data.pii import Placeholders

        placeholders = Placeholders()
        out: list[str | None] = []
        for text in texts:
            try:
                with self._step("guard_input"):
                    result = await self.steps.call("check_input", text, placeholders)
            except Exception:
                self.metrics.guard_actions.labels(self.served_name, "input", "blocked").inc()
                raise
            if result.action != "allowed":
                self.metrics.guard_actions.labels(self.served_name, "input", result.action).inc()
            placeholders = result.placeholders  # numbered in the steps' copy: the next prompt goes on from it
            out.append(result.redacted if result.action == "redacted" else None)
        return out, placeholders

    def _cache_key(self, req: ChatCompletionRequest, messages: list[dict], rag_version: Any
                   ) -> tuple[str, str] | None:
        from genforge.serve.cache import cache_key
        from genforge.serve.structured import format_key

        last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if last is None:
            return None
        turn = _text(messages[last].get("content"))
        system = "\n".join(_text(m.get("content")) for m in messages[:last] if m.get("role") in ("system", "developer"))
        history = [m for m in messages[:last] if m.get("role") not in ("system", "developer")] + messages[last + 1:]
        sampling = {k: getattr(req, k) for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p",
                                                 "top_k", "n", "stop", "seed", "presence_penalty",
                                                 "frequency_penalty", "repetition_penalty", "min_tokens",
                                                 "ignore_eos", "stop_token_ids")}
        # Structured output is keyed, not bypassed: the schema is part of the exact key, so a request
        # with a response_format only ever gets an answer stored under the same schema (never a free-text
        # one), and a judge asking the same question under the same schema gets its cached verdict.
        # None (free text, or {"type": "text"}) leaves the key as it was.
        sampling["response_format"] = format_key(req.response_format)
        rag_index = self.config.rag.index if self.rag_on else None
        if rag_index is not None:
            sampling["rag"] = {"k": self.config.rag.k, "mode": self.config.rag.mode}
        sampling["embedder"] = self.info["embedder_version"]  # vectors of another embedder are never compared
        # a watermarking deployment's answers are keyed by the watermark's key id (and the label): a request
        # is never handed an answer generated without its watermark, or under another tenant's key
        if self.labelling is not None and (mark := self.labelling.cache_part(req)) is not None:
            sampling["labelling"] = mark
        key = cache_key(self.served_name, self.model_version, system, sampling, rag_index, rag_version, history)
        return key, turn

    async def _cache_key_of(self, req: ChatCompletionRequest, out: Prepared) -> None:
        """Eligibility and the exact key: `out.cache` becomes "bypass", or "pending" for `_lookup`."""
        from genforge.serve.cache import is_cacheable

        ok, _why = is_cacheable(req.model_dump(), self.config.cache.allow_sampled,
                                default_temperature=self.default_temperature)
        if ok and (req.logprobs or req.add_generation_prompt is False):
            ok = False  # logprobs are not stored; a continued assistant turn is not a question
        keyed = None
        if ok:
            version = await self.steps.call("index_version", self.config.rag.index) if self.rag_on else None
            keyed = self._cache_key(req, out.messages, version)
        if keyed is None:
            out.cache = "bypass"
            self.metrics.cache_lookups.labels(self.served_name, "bypass").inc()
            return
        out.key, out.turn = keyed
        out.cache = "pending"

    async def _lookup(self, out: Prepared) -> None:
        """Look `out`'s turn up: the exact text, else near matches (one call to the steps)."""
        with self._step("cache_lookup", count_failures=False):
            out.hit, rejected = await self.steps.call("lookup", out.key, out.turn)
            if rejected:
                self.metrics.cache_rejections.labels(self.served_name).inc(rejected)
        out.cache = "hit" if out.hit is not None else "miss"
        self.metrics.cache_lookups.labels(self.served_name, out.cache).inc()

    async def _retrieve(self, out: Prepared, fits: Callable[[list[dict]], bool] | None) -> None:
        last = max((i for i, m in enumerate(out.messages) if m.get("role") == "user"), default=None)
        if last is None:
            return
        question = _text(out.messages[last].get("content"))
        if not question.strip():
            return
        with self._step("retrieve", count_failures=False):
            found = await self.steps.call("search", question, self.config.rag.k, self.config.rag.mode)

        def sourced(n: int) -> list[dict]:
            return with_sources(out.messages, last, question, [c for c, _ in found[:n]])

        # As many of the top sources as the model's context holds beside the answer: a short-context
        # model gets fewer (or none) rather than a 400 for every question.
        n = len(found)
        while n > 0 and fits is not None and not await asyncio.to_thread(fits, sourced(n)):
            n -= 1
        if n == 0:
            return
        self.metrics.retrievals.labels(self.served_name).inc()
        out.messages = sourced(n)
        out.sources = [{"id": c.id, "source": c.source, "score": round(float(score), 6)} for c, score in found[:n]]

    # ------------------------------------------------------------ after the engine

    async def remember(self, prepared: Prepared, response: ChatCompletionResponse) -> None:
        """Store a finished answer for later hits: only an eligible miss, only complete answers."""
        if not self.cache_on or prepared.cache != "miss":
            return
        if any(c.finish_reason not in ("stop", "length") for c in response.choices):
            return
        stored = {"choices": [{"index": c.index, "content": c.message.content, "finish_reason": c.finish_reason}
                              for c in response.choices],
                  "usage": response.usage.model_dump(), "sources": response.sources}
        try:
            with self._step("cache_put"):
                await self.steps.call("put", prepared.key, prepared.turn, stored)
        except StoreUnavailable as e:
            # The answer exists (and, streamed, has been sent but for its end): a store that went down
            # after the lookup costs this cache entry, not the response. The put was one transaction.
            log.warning("answer not cached: %s", e.message)
            return

    def observe_output(self, filters: list[Any] | None) -> None:
        """Count a response whose text the output guard changed (or, under `log`, would have)."""
        if self.guard is None or not filters:
            return
        if any(span.type != "ALLOW" for f in filters if f is not None for span in f.found):
            action = "logged" if self.guard.policy == "log" else "redacted"
            self.metrics.guard_actions.labels(self.served_name, "output", action).inc()

    async def invalidate(self, key: str | None) -> int:
        if not self.cache_on:
            raise NotFoundError("the semantic cache is off on this server (start it with --cache)", param="cache")
        return await self.steps.call("invalidate", key)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def model_version(model_path: str | Path | None, model: Any) -> str:
    """What identifies the weights for the cache key: the weight files' names, sizes and times, or the
    loaded model's config when it was passed in."""
    if model_path is not None:
        folder = Path(model_path)
        folder = folder / "model" if (folder / "model").is_dir() else folder
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    else:
        stamp = repr(getattr(model, "config", "")) + str(id(model))
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def replay_chat(prep: Prepared, req: ChatCompletionRequest, served_name: str, request: Any,
                watermark: dict | None = None, extra_headers: dict[str, str] | None = None) -> Response:
    """A cache hit as the response the engine would have given: JSON, or the same SSE events.
    `watermark`, `extra_headers`: a labelling deployment's field and header (serve/labelling.py); the
    cache key holds the watermark's key id, so the stored answer was generated under the same key."""
    stored = prep.hit.entry.response
    headers = {**prep.headers(), **(extra_headers or {})}
    rid, created = new_id("chatcmpl"), now()
    usage = UsageInfo(**stored["usage"])
    choices = stored["choices"]
    if not req.stream:
        body = ChatCompletionResponse(
            id=rid, created=created, model=served_name, usage=usage, sources=stored.get("sources"),
            watermark=watermark,
            choices=[ChatChoice(index=c["index"], message=AssistantMessage(content=c["content"]),
                                finish_reason=c["finish_reason"]) for c in choices])
        return JSONResponse(body.model_dump(), headers=headers)
    enc = ChunkEncoder(rid, created, served_name, chat=True, watermark=watermark)

    async def events() -> AsyncIterator[str]:
        yield "".join(enc.role(c["index"], stored.get("sources")) for c in choices)
        yield "".join(enc.token(c["index"], c["content"], c["finish_reason"]) for c in choices)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_name,
                       "choices": [], "usage": usage.model_dump(), **({"watermark": watermark} if watermark else {})})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
