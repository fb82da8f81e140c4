"""`genforge serve --model NAME@REF`: the OpenAI API over registry versions, with canary, shadow and
promotion / rollback without a restart (serve/versions.py has the roles and their rules).

    request -> Gate (auth, limits) -> route (route key -> primary or canary) -> that version's LMService
            -> response + x-genforge-model-version;   a copy to the shadow, never waited for

Admin routes (behind the API key, like every route but /health and /metrics):
    GET  /admin/versions                  the roles now
    POST /admin/promote   {"version"?}     the canary (or the named version) becomes the primary
    POST /admin/rollback                  back to the previous primary
    POST /admin/reload                    resolve NAME@ALIAS again (another replica may have moved it)
    POST /admin/canary    {"version", "share"}   set (or with "version": null, end) the canary

Metrics: the server's HTTP series as `genforge serve` has them, every loaded version's engine and
request series with a `version` label, and genforge:version_requests{version, role} per routed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, generate_latest

from genforge.common import tracing
from genforge.common.errors import ConfigError
from genforge.common.registry import ModelVersion, Registry, parse_ref
from genforge.serve.app_base import install_error_handlers, torch_dtype
from genforge.serve.app_config import AppConfig, default_state_dir
from genforge.serve.console import install_console, routing_features
from genforge.serve.gate import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, REQUEST_ID, Gate, validated
from genforge.serve.labelling import Labelling
from genforge.serve.metrics import CONTENT_TYPE, ServeMetrics
from genforge.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body
from genforge.serve.shadow import Shadow, answer_texts
from genforge.serve.version_routes import MergedRegistries, RouterMetrics, add_admin_routes, counted_stream
from genforge.serve.versions import ROUTE_KEY_HEADER, VERSION_HEADER, Served, VersionSet

log = logging.getLogger(__name__)
SHADOW_MAX_PENDING = 8



def build_version(version: ModelVersion, *, name: str, settings: dict, steps: Any, app_config: AppConfig,
                  labelling: Labelling, with_app_layer: bool = True) -> Served:
    """Load one version into its own LMService (blocking; called from a worker thread at runtime)."""
    import torch

    from genforge.common.config import IMAGE_FAMILIES
    from genforge.models.lm import load_lm
    from genforge.serve.pipeline import AppLayer
    from genforge.serve.service import LMService

    family = str(version.record.get("family", "lm"))
    if family in IMAGE_FAMILIES:
        raise ConfigError(f"{version.ref} is a {family} model; registry serving runs language models", param="model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_lm(version.path, device=device, dtype=torch_dtype(settings["dtype"]))
    metrics = ServeMetrics(name)
    app_layer = None
    if steps is not None and with_app_layer:
        # the version is part of the cache key: a canary never replays the primary's answers
        app_layer = AppLayer(app_config, steps=steps, metrics=metrics, served_name=name,
                             model_version=f"{version.ref}:{version.digest[:16]}")
    service = LMService(model, tokenizer, served_name=name, max_model_len=settings["max_model_len"],
                        max_batch_size=settings["max_batch_size"], max_queue=settings["max_queue"], metrics=metrics,
                        decode=settings["decode"], request_timeout=settings["request_timeout"],
                        kv_cache_bytes=settings["kv_cache_bytes"], stream_interval=settings["stream_interval"],
                        app_layer=app_layer, labelling=labelling)
    return Served(version, service, metrics)


def create_versioned_app(registry: Registry, ref: str, *, canary: tuple[str, float] | None = None,
                         shadow: str | None = None, shadow_log: str | Path | None = None, max_model_len: int | None = None,
                         dtype: str = "auto", max_batch_size: int = 32, max_queue: int = 256,
                         api_keys: list[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                         decode: str = "eager", request_timeout: float | None = None,
                         body_timeout: float = DEFAULT_BODY_TIMEOUT_S, limit_concurrency: int | None = None,
                         kv_cache_bytes: int | None = None, stream_interval: int = 1,
                         app_config: AppConfig | None = None, watermark: Any = None,
                         label_text: str | None = None, follow_interval: float | None = None) -> Gate:
    """The ASGI app serving registry reference `ref` (NAME@N, NAME@latest, NAME@ALIAS). Every version
    named is loaded and health-checked here, before any port is bound; a failure is one clear error.
    `follow_interval`: seconds between resolutions of `ref` again (as POST /admin/reload does), so a
    replica follows an alias moved elsewhere by itself; None: only on /admin/reload."""
    if follow_interval is not None and not follow_interval > 0:
        raise ConfigError(f"--follow-interval {follow_interval}: must be > 0 seconds", param="follow_interval")
    from genforge.serve.layer_process import LayerProcess
    from genforge.serve.layer_steps import LocalSteps
    from genforge.serve.options import check_keys

    keys = check_keys(list(api_keys or []), "api_keys")
    name = parse_ref(ref)[0]
    app_config = app_config or AppConfig()
    settings = {"dtype": dtype, "max_model_len": max_model_len, "max_batch_size": max_batch_size,
                "max_queue": max_queue, "decode": decode, "request_timeout": request_timeout,
                "kv_cache_bytes": kv_cache_bytes, "stream_interval": stream_interval}
    metrics = ServeMetrics(name)
    router = RouterMetrics(metrics)
    labelling = Labelling(watermark, label_text or None)
    steps = None
    if app_config.any_step:  # one set of steps (one embedder process) shared by every version
        steps = (LayerProcess(app_config, default_state_dir()) if app_config.own_process
                 else LocalSteps(app_config, default_state_dir(), None))
    shadow_version = registry.resolve(shadow).version if shadow is not None else None

    def build(version: ModelVersion) -> Served:
        return build_version(version, name=name, settings=settings, steps=steps, app_config=app_config,
                             labelling=labelling, with_app_layer=version.version != shadow_version)

    versions = VersionSet(registry, build, primary_ref=ref, on_switch=lambda action: _switched(action))
    try:
        versions.start(canary, shadow)
    except BaseException:
        for served in versions.loaded.values():
            served.service.engine.shutdown(drain=False)
        if steps is not None:
            steps.close()
        raise

    def _switched(action: str) -> None:
        router.switched(action, versions, lambda served: served.version.version)

    mirror = None
    if versions.shadow is not None:
        path = Path(shadow_log) if shadow_log is not None else registry.root / "shadow" / f"{versions.shadow.ref}.jsonl"
        mirror = Shadow(versions.shadow, path, max_pending=SHADOW_MAX_PENDING,
                        on_result=router.shadow_recorder(str(versions.shadow.version.version)))
    router.show_roles(versions, lambda served: served.version.version)

    async def follow() -> None:
        while True:
            await asyncio.sleep(follow_interval)
            try:
                async with versions.lock:
                    await versions.reload()
            except Exception as e:  # logged (a failed load says why); the versions serving stay as they are
                log.warning("following %s: %s", ref, getattr(e, "message", e))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follower = asyncio.get_running_loop().create_task(follow()) if follow_interval else None
        try:
            yield
        finally:
            if follower is not None:
                follower.cancel()
            if mirror is not None:
                await mirror.close()
            await versions.close()
            if steps is not None:
                steps.close()
            await asyncio.to_thread(tracing.flush)

    app = FastAPI(title="genforge", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", telemetry={"tracing": False})
    app.state.metrics, app.state.versions = metrics, versions
    install_error_handlers(app)

    def exposition_sources() -> list[tuple[CollectorRegistry, dict[str, str]]]:
        out = [(metrics.registry, {})]
        out += [(s.metrics.registry, {"version": str(n)}) for n, s in sorted(versions.loaded.items())]
        return out

    exposition = CollectorRegistry(auto_describe=False)
    exposition.register(MergedRegistries(exposition_sources))

    @app.get("/health")
    async def health() -> Response:
        if not versions.primary.service.healthy():
            return JSONResponse(error_body(f"the engine of {versions.primary.ref} is not running", "server_error"),
                                status_code=503)
        return JSONResponse({"status": "ok", "version": versions.primary.ref})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(exposition), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=versions.primary.ref,
                                         max_model_len=versions.primary.service.max_model_len)])

    async def dispatch(kind: str, body: Any, request: Request) -> Response:
        validated(request.scope)
        key = request.headers.get(ROUTE_KEY_HEADER) or getattr(body, "user", None)
        served, role = versions.pick(key)
        router.requests.labels(name, str(served.version.version), role).inc()
        primary_answer: asyncio.Future = asyncio.get_running_loop().create_future()
        if mirror is not None and mirror.served is not served:
            mirror.mirror(kind, body, request.scope.get(REQUEST_ID, ""), served.ref, primary_answer)
        served.in_flight += 1
        handler = served.service.chat if kind == "chat/completions" else served.service.completions
        try:
            response = await handler(body, request)
        except BaseException:
            served.in_flight -= 1
            primary_answer.set_result(None)
            raise
        response.headers[VERSION_HEADER] = served.ref
        if isinstance(response, StreamingResponse):
            response.body_iterator = counted_stream(response.body_iterator, served)
            primary_answer.set_result(None)
        else:
            served.in_flight -= 1
            if mirror is not None and response.status_code == 200:
                with contextlib.suppress(ValueError, AttributeError):
                    primary_answer.set_result(answer_texts(json.loads(bytes(response.body))))
            if not primary_answer.done():
                primary_answer.set_result(None)
        return response

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await dispatch("completions", body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await dispatch("chat/completions", body, request)

    add_admin_routes(app, versions)

    def features() -> dict[str, Any]:
        return routing_features(name, keys, versions.primary.service, app_config, version=versions.primary.ref,
                                watermark=watermark is not None)

    install_console(app, features, None)
    return Gate(app, api_keys=keys, max_body_bytes=max_body_bytes, metrics=metrics, body_timeout=body_timeout,
                limit_concurrency=limit_concurrency)




def serve_versions_forever(registry: Registry, ref: str, *, host: str = "127.0.0.1", port: int = 8000,
                           shutdown_timeout: float = 30.0, header_timeout: float = 10.0, keep_alive: float = 5.0,
                           root_path: str = "", http: str = "auto", loop: str = "auto", trace: str = "off",
                           **app_kw: Any) -> None:
    """`genforge serve --model NAME@REF`: load, then serve until SIGINT/SIGTERM (as serve_forever)."""
    import uvicorn

    from genforge.common.tracing import setup_tracing
    from genforge.serve.app_base import listen
    from genforge.serve.http import uvicorn_config
    from genforge.serve.options import exposure_warning
    from genforge.serve.tracing import log_request_ids

    ours = logging.getLogger("genforge")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    setup_tracing(trace)
    log_request_ids()
    warning = exposure_warning(host, list(app_kw.get("api_keys") or []))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_versioned_app(registry, ref, **app_kw)
    sock = listen(host, port)
    config = uvicorn_config(app, header_timeout=header_timeout, keep_alive=keep_alive,
                            limit_concurrency=app_kw.get("limit_concurrency"), shutdown_timeout=shutdown_timeout,
                            root_path=root_path, http=http, loop=loop)
    status = app.state.versions.status()
    roles = [f"primary {status['primary']['ref']}"]
    if status["canary"]:
        roles.append(f"canary {status['canary']['ref']} ({status['canary']['share']:g}%)")
    if status["shadow"]:
        roles.append(f"shadow {status['shadow']['ref']}")
    print(f"registry: {ref} -> " + ", ".join(roles) + f" (store {registry.store.url}, files {registry.root})",
          flush=True)
    print(f"serving {status['model']} on http://{host}:{port}{root_path}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
