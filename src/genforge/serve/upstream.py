"""`genforge serve --upstream URL`: the request path in front of another OpenAI-compatible engine.

`UpstreamService` has LMService's two entry points (`completions`, `chat`) but forwards the request to
URL/v1/... (vLLM, TGI, llama.cpp's server, another genforge) over one pooled httpx client. The body
the client sent is forwarded as it came (so fields genforge does not model still reach the engine),
with `model` replaced by --upstream-model when one is given and, for chat, `messages` replaced by what
the app layer made of them (guard redactions, retrieved sources). Answers, streamed or not, pass
through; only the output guard and --label-text touch their text. Upstream errors keep their status
and OpenAI error JSON; an upstream that cannot be reached is 502 `upstream_unavailable`, one that does
not answer in time 504 `upstream_timeout`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from genforge.common.errors import GenforgeError
from genforge.serve.gate import FIRST_TOKEN
from genforge.serve.labelling import Labelling
from genforge.serve.metrics import ServeMetrics
from genforge.serve.pipeline import AppLayer, replay_chat
from genforge.serve.protocol import SSE_DONE, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest
from genforge.serve.sse_stream import streaming_response

# Characters per token when fitting retrieved sources without the upstream's tokenizer: a deliberately
# low estimate (English BPE averages ~4), so sources that "fit" here fit upstream too.
CHARS_PER_TOKEN = 3
RAG_ANSWER_RESERVE = 64


class UpstreamError(GenforgeError):
    """The upstream could not be reached (502) or did not answer in time (504)."""

    type = "server_error"

    def __init__(self, message: str, *, status: int, code: str):
        super().__init__(message, code=code)
        self.status = status


class UpstreamService:
    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float | None = 600.0, max_model_len: int | None = None,
                 app_layer: AppLayer | None = None, labelling: Labelling | None = None,
                 metrics: ServeMetrics | None = None):
        """`model`: the name sent upstream (None: the client's `model`). `timeout`: seconds per upstream
        request (None: none). `max_model_len`: the upstream's context in tokens, for fitting RAG sources
        (estimated at CHARS_PER_TOKEN characters a token; None: sources are not trimmed)."""
        self.url = url.rstrip("/")
        self.metrics = metrics
        self.model = model
        self.max_model_len = max_model_len
        self.app = app_layer
        self.labelling = labelling or Labelling()
        if self.labelling.watermark is not None:
            raise GenforgeError("--watermark with --upstream: the upstream samples the tokens, so genforge cannot "
                                "bias them; use --label-text, or watermark in the upstream engine",
                                param="watermark")
        if app_layer is not None:
            app_layer.labelling = self.labelling
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One pooled client: connections to the upstream are reused across requests.
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    async def close(self) -> None:
        await self.client.aclose()

    # ------------------------------------------------------------ plumbing

    async def _send(self, method: str, path: str, body: dict | None = None, stream: bool = False,
                    timeout: float | None = None) -> httpx.Response:
        kw: dict[str, Any] = {"json": body} if body is not None else {}
        if timeout is not None:
            kw["timeout"] = timeout
        req = self.client.build_request(method, path, **kw)
        try:
            try:
                return await self.client.send(req, stream=stream)
            except httpx.RemoteProtocolError as e:
                # The upstream closed a kept-alive connection just as this request went out on it, before
                # answering anything (llama-server did under load: once in ~200 requests). The request never
                # got a response, so it is sent once more, on a fresh connection, as HTTP clients do.
                if "without sending a response" not in str(e):
                    raise
                return await self.client.send(self.client.build_request(method, path, **kw), stream=stream)
        except httpx.TimeoutException:
            raise UpstreamError(f"the upstream {self.url} did not answer in time", status=504,
                                code="upstream_timeout") from None
        except httpx.TransportError as e:
            raise UpstreamError(f"the upstream {self.url} cannot be reached ({type(e).__name__}: {e})",
                                status=502, code="upstream_unavailable") from None

    @staticmethod
    async def _body(req: Any, request: Request) -> dict:
        """The JSON the client sent (already validated by FastAPI against `req`'s model)."""
        raw = await request.body()
        return json.loads(raw) if raw else req.model_dump(exclude_unset=True)

    @staticmethod
    async def _error(resp: httpx.Response) -> Response:
        """The upstream's error as it gave it: status and body (made OpenAI-shaped if it is not)."""
        raw = await resp.aread()
        await resp.aclose()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or "error" not in body:
            text = raw.decode(errors="replace")[:500]
            body = {"error": {"message": f"upstream error: {text}", "type": "upstream_error", "param": None,
                              "code": None}}
        return JSONResponse(body, status_code=resp.status_code)

    def _observe_usage(self, usage: dict | None) -> None:
        """The upstream's token counts into this server's counters (the engine's own ones are upstream's)."""
        if self.metrics is None or not usage:
            return
        self.metrics.observe_prompt(int(usage.get("prompt_tokens") or 0))
        self.metrics.generation_tokens.labels(self.metrics.model_name).inc(int(usage.get("completion_tokens") or 0))

    async def models(self) -> Response:
        resp = await self._send("GET", "/v1/models", timeout=10.0)
        return JSONResponse(resp.json(), status_code=resp.status_code)

    async def health(self) -> dict:
        """{"url", "ok"}: ok when the upstream answers its /health (or, lacking one, /v1/models) with 200."""
        ok = False
        for path in ("/health", "/v1/models"):
            try:
                resp = await self.client.get(path, timeout=5.0)
            except httpx.HTTPError:
                break
            if resp.status_code != 404:
                ok = resp.status_code == 200
                break
        return {"url": self.url, "ok": ok}

    # ------------------------------------------------------------ the two entry points

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        body = await self._body(req, request)
        if self.model is not None:
            body["model"] = self.model
        guard = self.app.guard if self.app is not None else None
        placeholders = None
        if guard is not None:  # the guard covers every model call, not only chat (as on a model server)
            if req.logprobs is not None and guard.policy != "log":
                raise GenforgeError("logprobs: not available while the output guard filters responses (its "
                                    "tokens would show what the filter removed)", param="logprobs")
            prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise GenforgeError("prompt: token-id prompts cannot pass the input guard here (the gateway does "
                                    "not have the upstream model's tokenizer to read them); send the prompt as text",
                                    param="prompt")
            redacted, placeholders = await self.app.guard_texts(prompts)
            judged = [r if r is not None else p for p, r in zip(prompts, redacted)]
            body["prompt"] = judged[0] if isinstance(req.prompt, str) else judged
        return await self._forward("/v1/completions", body, req, request, chat=False, prep=None,
                                   make_filter=(lambda: guard.output_filter(placeholders)) if guard is not None
                                   else None)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        body = await self._body(req, request)
        if self.model is not None:
            body["model"] = self.model
        prep = None
        if self.app is not None and self.app.active:
            if req.logprobs and self.app.guard is not None and self.app.guard.policy != "log":
                raise GenforgeError("logprobs: not available while the output guard filters responses (its "
                                    "tokens would show what the filter removed)", param="logprobs")
            reserve = req.max_completion_tokens or req.max_tokens or RAG_ANSWER_RESERVE

            def fits(msgs: list[dict]) -> bool:  # no upstream tokenizer here: counted in characters
                if self.max_model_len is None:
                    return True
                chars = sum(len(json.dumps(m.get("content", ""))) for m in msgs)
                return chars / CHARS_PER_TOKEN + reserve <= self.max_model_len

            prep = await self.app.prepare(req, fits)
            await self.app.settle(prep)
            if prep.hit is not None:
                return replay_chat(prep, req, body.get("model") or "", request, None, {})
            body["messages"] = prep.messages
        make_filter = prep.output_filter if prep is not None and prep.output_filter() is not None else None
        return await self._forward("/v1/chat/completions", body, req, request, chat=True, prep=prep,
                                   make_filter=make_filter)

    # ------------------------------------------------------------ forwarding

    async def _forward(self, path: str, body: dict, req: Any, request: Request, *, chat: bool, prep: Any,
                       make_filter: Any) -> Response:
        extra = prep.headers() if prep is not None else {}
        if not req.stream:
            resp = await self._send("POST", path, body)
            if resp.status_code != 200:
                return await self._error(resp)
            out = resp.json()
            self._observe_usage(out.get("usage"))
            touched = make_filter is not None or self.labelling.label_text
            if touched:
                filters = [make_filter() if make_filter is not None else None for _ in out.get("choices", [])]
                for choice, f in zip(out.get("choices", []), filters):
                    text = choice["message"]["content"] if chat else choice["text"]
                    if text is not None:
                        text = (f.feed(text) + f.flush() if f is not None else text) + self.labelling.label()
                        if chat:
                            choice["message"]["content"] = text
                        else:
                            choice["text"] = text
                if self.app is not None and make_filter is not None:
                    self.app.observe_output(filters)
            if chat and prep is not None and self.app is not None:
                sources = prep.sources or None
                if sources:
                    out["sources"] = sources
                try:
                    parsed = ChatCompletionResponse.model_validate(out)
                except ValueError:
                    parsed = None  # an upstream answer genforge cannot model is passed on, not cached
                if parsed is not None:
                    await self.app.remember(prep, parsed)
            request.scope[FIRST_TOKEN] = "pending"  # the gate times the first token at this write
            return JSONResponse(out, headers=extra)
        resp = await self._send("POST", path, body, stream=True)
        if resp.status_code != 200:
            return await self._error(resp)
        return streaming_response(self._relay(resp, request, chat, make_filter, prep), extra)

    async def _relay(self, resp: httpx.Response, request: Request, chat: bool, make_filter: Any, prep: Any
                     ) -> AsyncIterator[str]:
        """The upstream's SSE events, one by one. Untouched answers pass as they came; with an output
        guard or a label, each event's text goes through its choice's filter, and what the filter still
        holds (and the label) goes out with the choice's finishing event. A cache miss's streamed answer
        is stored once the stream has ended."""
        touched = make_filter is not None or bool(self.labelling.label_text)
        filters: dict[int, Any] = {}
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        usage = None
        keep = prep is not None and self.app is not None and self.app.cache_on and prep.cache == "miss"
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and comments; events are re-framed below
                data = line[5:].strip()
                if data == "[DONE]":
                    yield SSE_DONE
                    continue
                if request.scope.get(FIRST_TOKEN) is None and ('"content"' in data or '"text"' in data):
                    request.scope[FIRST_TOKEN] = "pending"  # the gate times the first token at this write
                if not touched and not keep and '"usage"' not in data:
                    yield f"data: {data}\n\n"
                    continue
                event = json.loads(data)
                usage = event.get("usage") or usage
                if not touched:
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        texts.setdefault(choice.get("index", 0), []).append(text or "")
                        if choice.get("finish_reason") is not None:
                            finish[choice.get("index", 0)] = choice["finish_reason"]
                    yield f"data: {data}\n\n"
                    continue
                for choice in event.get("choices") or []:
                    f = filters.setdefault(choice.get("index", 0), make_filter() if make_filter else None)
                    holder = choice.get("delta") if chat else choice
                    if holder is None:
                        continue
                    text = holder.get("content" if chat else "text")
                    out = (f.feed(text) if f is not None else text) if text else text
                    if choice.get("finish_reason") is not None:
                        out = (out or "") + (f.flush() if f is not None else "") + self.labelling.label()
                    if text is not None or choice.get("finish_reason") is not None:
                        holder["content" if chat else "text"] = out
                    texts.setdefault(choice.get("index", 0), []).append(out or "")
                    if choice.get("finish_reason") is not None:
                        finish[choice.get("index", 0)] = choice["finish_reason"]
                yield f"data: {json.dumps(event)}\n\n"
        except httpx.TransportError:
            yield "data: " + json.dumps({"error": {"message": f"the upstream {self.url} broke off the stream",
                                                   "type": "server_error", "param": None,
                                                   "code": "upstream_unavailable"}}) + "\n\n"
            yield SSE_DONE
        finally:
            await resp.aclose()
            self._observe_usage(usage)
            if self.app is not None and make_filter is not None:
                self.app.observe_output(list(filters.values()))
        if keep and usage and texts and set(finish) == set(texts):
            await self.app.remember(prep, ChatCompletionResponse.model_validate({
                "id": "stream", "created": 0, "model": "", "usage": usage, "sources": prep.sources or None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                             "finish_reason": finish[i]} for i in sorted(texts)]}))
