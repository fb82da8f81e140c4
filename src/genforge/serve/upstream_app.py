"""The ASGI app and server loop of `genforge serve --upstream URL` (the service: serve/upstream.py).

    request -> Gate (auth, limits, metrics, tracing) -> route (route key -> primary or canary upstream)
            -> that upstream's UpstreamService (app layer, forward) -> response + x-genforge-model-version (URL)
            ;   a copy to the shadow upstream, never waited for

The same gate and error handlers as a model server; the roles among upstreams (--canary-upstream,
--shadow-upstream, promote / rollback) are serve/upstream_versions.py's, with the registry server's
admin routes (serve/version_routes.py; no /admin/reload: there is no alias to follow). /health asks
every upstream: 503 while the primary is down; a canary that is down is reported and takes no traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest

from genforge.common import tracing
from genforge.common.errors import NotFoundError
from genforge.serve.app_base import install_error_handlers, listen
from genforge.serve.app_config import AppConfig, default_state_dir
from genforge.serve.console import install_console, routing_features
from genforge.serve.documents import documents_router
from genforge.serve.embeddings import SharedEmbedder
from genforge.serve.gate import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, REQUEST_ID, Gate, validated
from genforge.serve.http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, uvicorn_config
from genforge.serve.labelling import Labelling
from genforge.serve.layer_process import LayerProcess
from genforge.serve.layer_steps import LocalSteps
from genforge.serve.metrics import CONTENT_TYPE, ServeMetrics
from genforge.serve.pipeline import AppLayer
from genforge.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from genforge.serve.shadow import Shadow, answer_texts
from genforge.serve.upstream import UpstreamError, UpstreamService
from genforge.serve.upstream_versions import HEALTH_INTERVAL_S, Upstream, UpstreamSet, check_url
from genforge.serve.version_routes import MergedRegistries, RouterMetrics, add_admin_routes, counted_stream
from genforge.serve.versions import ROUTE_KEY_HEADER, VERSION_HEADER

SHADOW_MAX_PENDING = 8  # shadow copies at once (beyond: dropped and counted), as the registry server's


def create_upstream_app(url: str, *, api_key: str | None = None, upstream_model: str | None = None,
                        served_model_name: str | None = None, api_keys: list[str] | None = None,
                        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
                        request_timeout: float | None = 600.0, limit_concurrency: int | None = None,
                        max_model_len: int | None = None, app_config: AppConfig | None = None,
                        label_text: str | None = None, canary: tuple[str, float] | None = None,
                        shadow: str | None = None, shadow_log: str | Path | None = None) -> Gate:
    """`canary`: (URL, share percent) of a second upstream; `shadow`: the URL of one that gets a copy of
    every request (its answers go to `shadow_log`, default ~/.cache/genforge/shadow/HOST_PORT.jsonl).
    The API key, upstream model name and timeout are the same for every upstream."""
    from genforge.serve.options import check_keys

    keys = check_keys(list(api_keys or []), "api_keys")
    url = check_url(url, "--upstream")
    name = served_model_name or upstream_model or "upstream"
    metrics = ServeMetrics(name)
    router = RouterMetrics(metrics)
    app_config = app_config or AppConfig()
    labelling = Labelling(None, label_text or None)
    steps = None
    embedder = SharedEmbedder(app_config.embedder)  # the steps' when they run here, and the uploads'
    if app_config.any_step:  # one set of steps (one embedder process) shared by every upstream
        steps = (LayerProcess(app_config, default_state_dir()) if app_config.own_process
                 else LocalSteps(app_config, default_state_dir(), embedder))

    def build(target: str, number: int) -> Upstream:
        own = ServeMetrics(name)
        app_layer = None
        if steps is not None and target != shadow:  # the shadow sees requests as the client sent them
            # the upstream is part of the cache key: a canary never replays the primary's answers
            app_layer = AppLayer(app_config, steps=steps, metrics=own, served_name=name,
                                 model_version=f"upstream:{target}:{upstream_model or ''}")
        service = UpstreamService(target, api_key=api_key, model=upstream_model, timeout=request_timeout,
                                  max_model_len=max_model_len, app_layer=app_layer, labelling=labelling, metrics=own)
        return Upstream(number, service, own)

    try:
        upstreams = UpstreamSet(build, url, name=name, canary=canary, shadow=shadow,
                                on_switch=lambda action: _switched(action))
    except BaseException:
        if steps is not None:
            steps.close()
        raise

    def _switched(action: str) -> None:
        router.switched(action, upstreams, lambda upstream: upstream.number)

    mirror = None
    if upstreams.shadow is not None:
        where = urllib.parse.urlsplit(shadow).netloc.replace(":", "_")
        path = Path(shadow_log) if shadow_log is not None else default_state_dir().parent / "shadow" / f"{where}.jsonl"
        mirror = Shadow(upstreams.shadow, path, max_pending=SHADOW_MAX_PENDING,
                        on_result=router.shadow_recorder(upstreams.shadow.ref))
    router.show_roles(upstreams, lambda upstream: upstream.number)

    async def watch_canary() -> None:
        """A canary found down comes back once its /health answers 200 again."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            if upstreams.canary is not None:
                with contextlib.suppress(Exception):  # a failed check leaves the roles as they are
                    await upstreams.check_health([upstreams.canary])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.get_running_loop().create_task(watch_canary())
        try:
            yield
        finally:
            watcher.cancel()
            if mirror is not None:
                await mirror.close()
            await upstreams.close()
            if steps is not None:
                steps.close()
            await asyncio.to_thread(tracing.flush)

    app = FastAPI(title="genforge", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", telemetry={"tracing": False})
    app.state.metrics, app.state.upstreams, app.state.alerts = metrics, upstreams, None
    install_error_handlers(app)

    exposition = CollectorRegistry(auto_describe=False)
    exposition.register(MergedRegistries(lambda: [(metrics.registry, {})] + [
        (u.metrics.registry, {"version": u.ref}) for u in upstreams.loaded.values()]))

    @app.get("/health")
    async def health() -> Response:
        await upstreams.check_health()
        primary = upstreams.primary
        upstream = {"url": primary.ref, "ok": primary.ok}
        roles = {"upstream": upstream, "upstreams": upstreams.status()}
        if not primary.ok:
            body = error_body(f"the upstream {primary.ref} is not healthy", "server_error")
            return JSONResponse({**body, **roles}, status_code=503)
        if steps is not None and not steps.alive:
            return JSONResponse({**error_body("the application layer's process has exited; restart the server",
                                              "server_error"), **roles}, status_code=503)
        return JSONResponse({"status": "ok", **roles})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(exposition), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> Response:
        return await upstreams.primary.service.models()

    async def answer(target: Upstream, role: str, kind: str, body: Any, request: Request) -> Response:
        router.requests.labels(name, target.ref, role).inc()
        target.in_flight += 1
        handler = target.service.chat if kind == "chat/completions" else target.service.completions
        try:
            response = await handler(body, request)
        except BaseException:
            target.in_flight -= 1
            raise
        response.headers[VERSION_HEADER] = target.ref
        if isinstance(response, StreamingResponse):
            response.body_iterator = counted_stream(response.body_iterator, target)
        else:
            target.in_flight -= 1
        return response

    async def dispatch(kind: str, body: Any, request: Request) -> Response:
        validated(request.scope)
        target, role = upstreams.pick(request.headers.get(ROUTE_KEY_HEADER) or getattr(body, "user", None))
        answered: asyncio.Future = asyncio.get_running_loop().create_future()
        if mirror is not None and mirror.served is not target:
            mirror.mirror(kind, body, request.scope.get(REQUEST_ID, ""), target.ref, answered)
        try:
            try:
                response = await answer(target, role, kind, body, request)
            except UpstreamError as e:
                # A canary that cannot be reached never took the request: the primary answers it.
                if role != "canary" or e.code != "upstream_unavailable":
                    raise
                upstreams.mark_down(target, e.message)
                response = await answer(upstreams.primary, "primary", kind, body, request)
        except BaseException:
            answered.set_result(None)
            raise
        if mirror is not None and response.status_code == 200 and not isinstance(response, StreamingResponse):
            with contextlib.suppress(ValueError, AttributeError):
                answered.set_result(answer_texts(json.loads(bytes(response.body))))
        if not answered.done():
            answered.set_result(None)
        return response

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await dispatch("completions", body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await dispatch("chat/completions", body, request)

    @app.delete("/v1/cache")
    async def invalidate_cache(key: str | None = None) -> JSONResponse:
        layers = [u.service.app for u in upstreams.loaded.values() if u.service.app is not None]
        if not layers:
            raise NotFoundError("the semantic cache is off on this server (start it with --cache)", param="cache")
        deleted = await layers[0].invalidate(key)  # one store, shared by every upstream's layer
        return JSONResponse({"object": "cache.deleted", "deleted": deleted, "key": key})

    app.include_router(documents_router(app_config, steps, embedder, default_state_dir()))
    add_admin_routes(app, upstreams, reload=False)

    def features() -> dict[str, Any]:
        return routing_features(name, keys, upstreams.primary.service, app_config, upstream=upstreams.primary.ref)

    install_console(app, features, None)
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
    sock = listen(host, port)
    config = uvicorn_config(app, header_timeout=header_timeout, keep_alive=keep_alive,
                            limit_concurrency=limit_concurrency, shutdown_timeout=shutdown_timeout,
                            root_path=root_path, http=http, loop=loop)
    upstreams = app.app.state.upstreams
    service = upstreams.primary.service
    if service.app is not None:
        print(f"app layer: {service.app.describe()}", flush=True)
    if service.labelling.active:
        print(f"labelling: {service.labelling.start_line()}", flush=True)
    if upstreams.canary is not None:
        print(f"canary upstream: {upstreams.canary.ref} ({upstreams.canary_share:g}% of requests)", flush=True)
    if upstreams.shadow is not None:
        print(f"shadow upstream: {upstreams.shadow.ref}", flush=True)
    print(f"serving upstream {upstreams.primary.ref} on http://{host}:{port}{root_path}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
