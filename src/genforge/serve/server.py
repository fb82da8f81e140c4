"""The OpenAI-compatible HTTP server: `create_app` builds the FastAPI app, `serve_forever` runs it.

    request -> _Gate (auth, body size, HTTP metrics; before any parsing)
            -> FastAPI (pydantic validation; errors become OpenAI-style 400s naming the field)
            -> LMService (prompt -> token ids -> SamplingParams -> engine) -> JSON or SSE

The engine (serve/engine.py) batches all requests' tokens in one scheduler thread; this module
only turns HTTP into engine submissions and engine events into OpenAI responses. A client that
goes away (streaming or not) cancels its sequences in the engine at once, so an abandoned request
does not keep a batch slot.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from genforge.common.errors import AuthError, ConfigError, GenforgeError
from genforge.serve.metrics import CONTENT_TYPE, ServeMetrics
from genforge.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body
from genforge.serve.service import LMService

DEFAULT_MAX_BODY_BYTES = 1 << 20  # OpenAI-sized requests are far smaller; this bounds parser memory
RETRY_AFTER_S = 1  # what a 503 asks clients to wait; the queue drains in about a decode step per token
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/images/generations",
              "/health", "/metrics")


async def _send_json(send: Any, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class _Gate:
    """Pure-ASGI front door: checks the API key and the body size before FastAPI parses anything.

    The body is read here, capped, and replayed to the app, so a huge or endless chunked body is
    refused after `max_body_bytes` without ever being held whole in memory or parsed.
    """

    def __init__(self, app: Any, *, api_keys: list[str], max_body_bytes: int, metrics: ServeMetrics):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes
        self.keys = [k.encode() for k in api_keys if k]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 0

        async def send_(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_)
        finally:
            path = scope["path"] if scope["path"] in _ENDPOINTS else "other"
            # 499 (nginx's "client closed request"): the client left before any response started.
            self.metrics.observe_http(path, status or 499, time.perf_counter() - start)

    def _authorized(self, scope: dict) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # compare against every key in constant time, so timing reveals neither key nor position
        return any([hmac.compare_digest(token.strip(), k) for k in self.keys])

    async def _handle(self, scope: dict, receive: Any, send: Any) -> None:
        if self.keys and scope["path"].startswith("/v1/") and not self._authorized(scope):
            err = AuthError("invalid or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await _send_json(send, 401, err.to_openai(), [(b"www-authenticate", b"Bearer")])
        if scope["method"] in ("POST", "PUT", "PATCH"):
            receive = await self._read_body(scope, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def _read_body(self, scope: dict, receive: Any, send: Any) -> Any:
        limit = self.max_body
        too_big = error_body(f"request body exceeds the limit of {limit} bytes", param=None,
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                await _send_json(send, 400, error_body("Content-Length header is not an integer"))
                return None
            if declared_n > limit:
                await _send_json(send, 413, too_big, [(b"connection", b"close")])
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked bodies declare no length: count as they arrive
                await _send_json(send, 413, too_big, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects still arrive

        return replay


# ---------------------------------------------------------------- validation errors -> OpenAI 400s

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|function-.*|.*\[.*\])$")


def _param_of(loc: tuple) -> str | None:
    """'messages[0].role' from pydantic's ('body', 'messages', 0, 'role'); union tags dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(str(part)):
            out += f".{part}" if out else str(part)
    return out or None


def _validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON ({detail} at position {first['loc'][-1]})", None
    param = _param_of(tuple(first.get("loc", ())))
    if param is None:
        if first.get("type") == "missing":
            return "request body is missing; send a JSON object", None
        return "request body must be a JSON object", None
    # A union (e.g. prompt: str | list[str] | list[int]) reports once per alternative: keep the
    # errors for the same field together so the message lists what would have been accepted.
    msgs = list(dict.fromkeys(e["msg"] for e in errors if _param_of(tuple(e.get("loc", ()))) == param))
    if len(msgs) > 1:
        msgs = ["should be " + " or ".join(m.removeprefix("Input should be ") for m in msgs)]
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    if first.get("type") == "missing":
        return f"{param}: field required", param
    return f"{param}: {msgs[0]} (got {got})", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GenforgeError)
    async def _genforge(request: Request, exc: GenforgeError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else None
        return JSONResponse(exc.to_openai(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_error(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", kind),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a bug: still answer in shape
        return JSONResponse(error_body(f"internal server error ({type(exc).__name__})", "internal_server_error"),
                            status_code=500)


# ---------------------------------------------------------------- the app


def _run_family(path: Path) -> str:
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        from genforge.common.runs import RunDir

        return str(RunDir(path).read_recipe().get("family", "lm"))
    return "lm"


def _torch_dtype(dtype: str | None) -> Any:
    import torch

    choices = {None: None, "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ConfigError(f"--dtype: {dtype!r} is not one of auto, float32, bfloat16", param="dtype")
    return choices[dtype]


def create_app(model_path: str | Path | None = None, *, model: Any = None, tokenizer: Any = None,
               served_model_name: str | None = None, max_model_len: int | None = None, dtype: str = "auto",
               max_batch_size: int = 32, max_queue: int = 256, api_keys: list[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, compile: bool = False) -> Any:
    """The ASGI app for a run dir / HF folder (`model_path`) or an already loaded model+tokenizer.

    Loading happens here, before any port is bound, so a bad path fails with one clear error.
    """
    if model is None and model_path is None:
        raise ConfigError("create_app: give a model path or a loaded model and tokenizer")
    name = served_model_name or (str(model_path) if model_path is not None else "genforge")
    metrics = ServeMetrics(name)
    family = _run_family(Path(model_path)) if model is None else "lm"
    service: LMService | None = None
    if family == "lm":
        if model is None:
            import torch

            from genforge.models.lm import load_lm

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model, tokenizer = load_lm(model_path, device=device, dtype=_torch_dtype(dtype))
        service = LMService(model, tokenizer, served_name=name, max_model_len=max_model_len,
                            max_batch_size=max_batch_size, max_queue=max_queue, metrics=metrics,
                            compile=compile)
    elif not Path(model_path).is_dir():
        raise ConfigError(f"model not found: {model_path}", param="model")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service is not None:
            await service.start()
        try:
            yield
        finally:
            # uvicorn calls this after it stopped accepting and in-flight requests finished;
            # drain=True still lets anything the engine holds run to completion.
            if service is not None:
                await service.shutdown()

    app = FastAPI(title="genforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.service = metrics, service
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if service is not None and not service.healthy():
            return JSONResponse(error_body("engine is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        limit = service.max_model_len if service is not None else None
        return ModelList(data=[ModelCard(id=name, root=str(model_path or name), max_model_len=limit)])

    if service is not None:
        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            return await service.completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Response:
            return await service.chat(body, request)
    else:
        # Image runs: the image engineer's router owns generation; this module only mounts it.
        from genforge.serve.images import images_router

        app.include_router(images_router(Path(model_path)))

    return _Gate(app, api_keys=list(api_keys or []), max_body_bytes=max_body_bytes, metrics=metrics)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so a busy port is one clear error, not a logged traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port",
                          param="port") from None
    return sock


def serve_forever(model: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
                  max_model_len: int | None = None, dtype: str = "auto", max_batch_size: int = 32,
                  max_queue: int = 256, api_keys: list[str] | None = None, compile: bool = True) -> None:
    """Load MODEL and serve it until SIGINT/SIGTERM, then finish the requests in flight and exit."""
    import uvicorn

    if not Path(model).exists():
        raise ConfigError(f"model not found: {model} (expected a run directory or a Hugging Face model folder)",
                          param="model")
    app = create_app(model, served_model_name=served_model_name, max_model_len=max_model_len, dtype=dtype,
                     max_batch_size=max_batch_size, max_queue=max_queue, api_keys=api_keys,
                     compile=compile)
    sock = _listen(host, port)
    # uvicorn's own SIGTERM handling is the graceful part: stop accepting, wait for open requests
    # (streams included; no timeout, they end by max_tokens), then run the lifespan shutdown.
    config = uvicorn.Config(app, log_level="info", lifespan="on", timeout_graceful_shutdown=None,
                            access_log=False)
    print(f"serving {served_model_name or model} on http://{host}:{port}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
