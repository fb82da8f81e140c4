"""The ASGI app and server loop of `genforge serve --upstream URL` (the service: serve/upstream.py).

The same gate (auth, limits, metrics, tracing) and error handlers as a model server; the routes
forward to the upstream; /health is 503 while the upstream is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from genforge.common import tracing
from genforge.common.errors import NotFoundError
from genforge.serve.app_config import AppConfig, default_state_dir
from genforge.serve.embeddings import SharedEmbedder
from genforge.serve.gate import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, Gate, validated
from genforge.serve.http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, uvicorn_config
from genforge.serve.labelling import Labelling
from genforge.serve.layer_process import LayerProcess
from genforge.serve.layer_steps import LocalSteps
from genforge.serve.metrics import CONTENT_TYPE, ServeMetrics
from genforge.serve.pipeline import AppLayer
from genforge.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from genforge.serve.server import _install_error_handlers, _listen
from genforge.serve.upstream import UpstreamService


def create_upstream_app(url: str, *, api_key: str | None = None, upstream_model: str | None = None,
                        served_model_name: str | None = None, api_keys: list[str] | None = None,
                        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
                        request_timeout: float | None = 600.0, limit_concurrency: int | None = None,
                        max_model_len: int | None = None, app_config: AppConfig | None = None,
                        label_text: str | None = None) -> Gate:
    from genforge.serve.options import check_keys

    keys = check_keys(list(api_keys or []), "api_keys")
    name = served_model_name or upstream_model or "upstream"
    metrics = ServeMetrics(name)
    app_config = app_config or AppConfig()
    app_layer = None
    if app_config.any_step:
        steps = (LayerProcess(app_config, default_state_dir()) if app_config.own_process
                 else LocalSteps(app_config, default_state_dir(), SharedEmbedder(app_config.embedder)))
        app_layer = AppLayer(app_config, steps=steps, metrics=metrics, served_name=name,
                             model_version=f"upstream:{url}:{upstream_model or ''}")
    service = UpstreamService(url, api_key=api_key, model=upstream_model, timeout=request_timeout,
                              max_model_len=max_model_len, app_layer=app_layer,
                              labelling=Labelling(None, label_text or None), metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await service.close()
            if app_layer is not None:
                app_layer.close()
            await asyncio.to_thread(tracing.flush)

    app = FastAPI(title="genforge", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", telemetry={"tracing": False})
    app.state.metrics, app.state.service, app.state.alerts = metrics, service, None
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        upstream = await service.health()
        if not upstream["ok"]:
            body = error_body(f"the upstream {upstream['url']} is not healthy", "server_error")
            return JSONResponse({**body, "upstream": upstream}, status_code=503)
        if app_layer is not None and not app_layer.steps.alive:
            return JSONResponse({**error_body("the application layer's process has exited; restart the server",
                                              "server_error"), "upstream": upstream}, status_code=503)
        return JSONResponse({"status": "ok", "upstream": upstream})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return await service.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        validated(request.scope)
        return await service.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        validated(request.scope)
        return await service.chat(body, request)

    @app.delete("/v1/cache")
    async def invalidate_cache(key: str | None = None) -> JSONResponse:
        if app_layer is None:
            raise NotFoundError("the semantic cache is off on this server (start it with --cache)", param="cache")
        deleted = await app_layer.invalidate(key)
        return JSONResponse({"object": "cache.deleted", "deleted": deleted, "key": key})

    return Gate(app, api_keys=keys, max_body_bytes=max_body_bytes, metrics=metrics, body_timeout=body_timeout,
                limit_concurrency=limit_concurrency)


def serve_upstream(url: str, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                   header_timeout: float = DEFAULT_HEADER_TIMEOUT_S, keep_alive: float = DEFAULT_KEEP_ALIVE_S,
                   root_path: str = "", http: str = "auto", loop: str = "auto", trace: str = "off",
                   limit_concurrency: int | None = None, **app_kw) -> None:
    """Serve the gateway in front of URL until SIGINT/SIGTERM (the options as serve_forever's)."""
    import uvicorn

    from genforge.common.tracing import setup_tracing
    from genforge.serve.options import exposure_warning
    from genforge.serve.tracing import log_request_ids

    setup_tracing(trace)
    log_request_ids()
    warning = exposure_warning(host, list(app_kw.get("api_keys") or []))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_upstream_app(url, limit_concurrency=limit_concurrency, **app_kw)
    sock = _listen(host, port)
    config = uvicorn_config(app, header_timeout=header_timeout, keep_alive=keep_alive,
                            limit_concurrency=limit_concurrency, shutdown_timeout=shutdown_timeout,
                            root_path=root_path, http=http, loop=loop)
    service = app.app.state.service
    if service.app is not None:
        print(f"app layer: {service.app.describe()}", flush=True)
    if service.labelling.active:
        print(f"labelling: {service.labelling.start_line()}", flush=True)
    print(f"serving upstream {url} on http://{host}:{port}{root_path}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
