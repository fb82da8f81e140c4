"""The OpenAI-compatible HTTP server: `create_app` builds the ASGI app, `serve_forever` runs it.

    request -> Gate (auth, concurrency, body size/time, JSON depth; before any parsing; serve/gate.py)
            -> FastAPI (pydantic validation; errors become OpenAI-style 400s naming the field)
            -> LMService (prompt -> token ids -> SamplingParams -> engine) -> JSON or SSE

The engine (serve/engine.py) batches all requests' tokens in one scheduler thread; this module
only turns HTTP into engine submissions and engine events into OpenAI responses. A client that
goes away (streaming or not) cancels its sequences in the engine at once, so an abandoned request
does not keep a batch slot or a queue place. A 5xx never carries exception text: the client gets
an error id, the log gets the traceback under that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from genforge.common import tracing
from genforge.common.errors import ConfigError, NotFoundError
from genforge.data.image_labels import ImageLabelling
from genforge.serve.adapters import DEFAULT_MAX_LOADED, AdapterRegistry
from genforge.serve.alerts import AlertSampler
from genforge.serve.app_base import install_error_handlers, listen, torch_dtype
from genforge.serve.app_config import AppConfig, default_state_dir
from genforge.serve.console import app_features, install_console, run_dir_of
from genforge.serve.detect import detect_router
from genforge.serve.documents import documents_router
from genforge.serve.embeddings import SharedEmbedder, embeddings_router
from genforge.serve.gate import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, Gate, validated
from genforge.serve.http import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, uvicorn_config
from genforge.serve.labelling import Labelling
from genforge.serve.layer_process import LayerProcess
from genforge.serve.layer_steps import LocalSteps
from genforge.serve.metrics import CONTENT_TYPE, ServeMetrics
from genforge.serve.pipeline import AppLayer, model_version
from genforge.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body
from genforge.serve.service import LMService

log = logging.getLogger(__name__)
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # queue + generation; a full-context answer on a CPU fits well within
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
RAG_MIN_CONTEXT = 512  # below this a RAG prompt (template + a few sources + question) rarely fits


# ---------------------------------------------------------------- the app


def _run_family(path: Path) -> str:
    """"lm" for a language-model run (pre-trained, fine-tuned, aligned, distilled) or an HF folder, else
    the image family of the run."""
    from genforge.models.text_to_image import FAMILY, is_text_to_image

    if is_text_to_image(path):  # RUN or RUN/model: its genforge.json says so
        return FAMILY
    recipe = path / "recipe.yaml"
    if recipe.is_file():
        from genforge.common.config import IMAGE_FAMILIES
        from genforge.common.runs import RunDir

        family = str(RunDir(path).read_recipe().get("family", "lm"))
        return family if family in IMAGE_FAMILIES else "lm"
    return "lm"


def default_served_name(path: str | Path) -> str:
    """The name a model is served under when none is given: its folder's name, never a path
    (a run's model/ folder takes the run's name)."""
    p = Path(path).resolve()
    if p.name == "model" and (p.parent / "recipe.yaml").is_file():
        return p.parent.name
    return p.name or "genforge"


def create_app(model_path: str | Path | None = None, *, model: Any = None, tokenizer: Any = None,
               served_model_name: str | None = None, max_model_len: int | None = None, dtype: str = "auto",
               max_batch_size: int = 32, max_queue: int = 256, api_keys: list[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, decode: str = "eager",
               request_timeout: float | None = None, body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
               limit_concurrency: int | None = None, kv_cache_bytes: int | None = None,
               image_max_queue: int = 8, stream_interval: int = 1, app_config: AppConfig | None = None,
               adapters: dict[str, Path] | None = None, max_loaded_adapters: int = DEFAULT_MAX_LOADED,
               image_labelling: ImageLabelling | None = None, watermark: Any = None,
               label_text: str | None = None) -> Gate:
    """The ASGI app for a run dir / HF folder (`model_path`) or an already loaded model+tokenizer.

    Loading happens here, before any port is bound, so a bad path fails with one clear error.
    `api_keys`: every route but /health and /metrics needs one of them (none given: no auth; an
    empty key is an error). `request_timeout`: seconds from arrival to the last token (None: none).
    `limit_concurrency`: requests in flight at once (503 above). `kv_cache_bytes`: the KV cache budget.
    `app_config`: the application-layer steps (cache, RAG, guard; serve/app_config.py) and the embedder.
    `adapters`: {name: peft folder} of LoRA adapters over the model, each served under its name, at
    most `max_loaded_adapters` in memory at once (serve/adapters.py).
    `image_labelling`: image runs' visible label / invisible mark (the AIGC metadata is always written).
    `watermark` (a models.watermark.TextWatermark) and `label_text`: a labelling LM deployment
    (serve/labelling.py).
    """
    if model is None and model_path is None:
        raise ConfigError("create_app: give a model path or a loaded model and tokenizer")
    from genforge.serve.options import check_keys

    keys = check_keys(list(api_keys or []), "api_keys")
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size {max_batch_size}: must be at least 1", param="max_batch_size")
    if max_queue < 1:
        raise ConfigError(f"--max-queue {max_queue}: must be at least 1", param="max_queue")
    if limit_concurrency is not None and limit_concurrency < 1:
        raise ConfigError(f"--limit-concurrency {limit_concurrency}: must be at least 1", param="limit_concurrency")
    name = served_model_name or (default_served_name(model_path) if model_path is not None else "genforge")
    aliases = (str(model_path),) if model_path is not None else ()
    metrics = ServeMetrics(name)
    family = _run_family(Path(model_path)) if model is None else "lm"
    service: LMService | None = None
    app_config = app_config or AppConfig()
    shared_embedder = SharedEmbedder(app_config.embedder)
    if family == "lm":
        if adapters and app_config.cache.enabled:
            raise ConfigError("--cache with adapters: the semantic cache keys answers by the base model and would "
                              "mix the adapters' answers; serve adapters without --cache", param="cache")
        steps = None
        if app_config.any_step:  # started first: its process loads the embedder while the model loads
            steps = (LayerProcess(app_config, default_state_dir()) if app_config.own_process
                     else LocalSteps(app_config, default_state_dir(), shared_embedder))
        try:
            if model is None:
                import torch

                from genforge.models.lm import load_lm

                device = "cuda" if torch.cuda.is_available() else "cpu"
                model, tokenizer = load_lm(model_path, device=device, dtype=torch_dtype(dtype))
            registry = None
            if adapters:
                registry = AdapterRegistry(adapters, model, name, max_loaded=max_loaded_adapters,
                                           served_path=Path(model_path) if model_path is not None else None)
            app_layer = None
            if steps is not None:
                app_layer = AppLayer(app_config, steps=steps, metrics=metrics, served_name=name,
                                     model_version=model_version(model_path, model))
            service = LMService(model, tokenizer, served_name=name, max_model_len=max_model_len,
                                max_batch_size=max_batch_size, max_queue=max_queue, metrics=metrics,
                                decode=decode, request_timeout=request_timeout, kv_cache_bytes=kv_cache_bytes,
                                aliases=aliases, stream_interval=stream_interval, app_layer=app_layer,
                                adapters=registry, labelling=Labelling(watermark, label_text or None))
        except BaseException:
            if steps is not None:
                steps.close()
            raise
    alerts = AlertSampler(metrics, app_config.alerts) if service is not None and app_config.alerts.enabled else None
    if adapters and service is None:
        raise ConfigError("--adapter: LoRA adapters are served over language models only", param="adapter")
    if service is None and not Path(model_path).is_dir():
        raise ConfigError(f"model not found: {model_path}", param="model")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service is not None:
            await service.start()
        if alerts is not None:
            alerts.start()
        try:
            yield
        finally:
            if alerts is not None:
                alerts.stop()
            # uvicorn calls this after its own drain (--shutdown-timeout): every HTTP request has
            # ended or been cancelled, which cancelled its sequences; a short grace, then abort.
            if service is not None:
                await service.shutdown(timeout=1.0)
                if service.app is not None:
                    service.app.close()
            await asyncio.to_thread(tracing.flush)  # the spans of the last requests, before the process ends

    # FastAPI's own OpenTelemetry spans start a second root per request (from the headers, not the
    # current span): the gate's root span (serve/gate.py) is the one, with the steps under it.
    app = FastAPI(title="genforge", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", telemetry={"tracing": False})
    app.state.metrics, app.state.service, app.state.alerts = metrics, service, alerts
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if service is not None and not service.healthy():
            fault = service.engine.fault
            why = f"the engine failed (error id {fault}) and has not recovered yet" if fault else \
                "the engine is not running"
            return JSONResponse(error_body(why, "server_error"), status_code=503)
        if service is not None and service.app is not None and not service.app.steps.alive:
            return JSONResponse(error_body("the application layer's process has exited; restart the server",
                                           "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> ModelList:
        limit = service.max_model_len if service is not None else None
        cards = [ModelCard(id=name, root=name, max_model_len=limit)]
        if service is not None and service.adapters is not None:  # as vLLM lists LoRA modules
            cards += [ModelCard(id=a, root=name, parent=name, max_model_len=limit) for a in service.adapters.names]
        return ModelList(data=cards)

    image_features: dict | None = None
    if service is not None:
        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Response:
            validated(request.scope)
            return await service.completions(body, request)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request) -> Response:
            validated(request.scope)
            return await service.chat(body, request)

        app.include_router(embeddings_router(shared_embedder))
        app.include_router(documents_router(app_config, steps, shared_embedder, default_state_dir()))
        mark = image_labelling.mark if image_labelling is not None else None
        app.include_router(detect_router(service.tokenizer, service.labelling, mark.key if mark is not None else None))

        @app.delete("/v1/cache")
        async def invalidate_cache(key: str | None = None) -> JSONResponse:
            """Drop every cached answer, or those of one exact key (the x-genforge-cache-key header)."""
            if service.app is None:
                raise NotFoundError("the semantic cache is off on this server (start it with --cache)",
                                    param="cache")
            deleted = await service.app.invalidate(key)
            return JSONResponse({"object": "cache.deleted", "deleted": deleted, "key": key})
    else:
        # Image runs: the image engineer's router owns generation; this module only mounts it.
        from genforge.serve.images import images_router

        router = images_router(Path(model_path), max_queue=image_max_queue, labelling=image_labelling,
                               model_name=name)
        image_features = router.image_features
        app.include_router(router)
        mark = image_labelling.mark if image_labelling is not None else None
        app.include_router(detect_router(None, None, mark.key if mark is not None else None))

    def features() -> dict[str, Any]:
        return {"model": name, "family": family, "auth": bool(keys),
                "chat": service is not None, "completions": service is not None,
                "max_model_len": service.max_model_len if service is not None else None,
                "adapters": list(service.adapters.names) if service is not None and service.adapters else [],
                "images": image_features if service is None else None,
                **app_features(app_config, service.app if service is not None else None),
                "watermark": bool(service is not None and service.labelling.watermark is not None
                                  or image_labelling is not None and image_labelling.mark is not None),
                "detect": True, "embeddings": service is not None, "metrics": True}

    install_console(app, features, run_dir_of(model_path))
    return Gate(app, api_keys=keys, max_body_bytes=max_body_bytes, metrics=metrics, body_timeout=body_timeout,
                limit_concurrency=limit_concurrency)


def serve_forever(model: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
                  max_model_len: int | None = None, dtype: str = "auto", max_batch_size: int = 32,
                  max_queue: int = 256, api_keys: list[str] | None = None, decode: str = "prepacked",
                  request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
                  shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S, limit_concurrency: int | None = None,
                  header_timeout: float = DEFAULT_HEADER_TIMEOUT_S, body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
                  keep_alive: float = DEFAULT_KEEP_ALIVE_S, kv_cache_bytes: int | None = None,
                  root_path: str = "", stream_interval: int = 1, app_config: AppConfig | None = None,
                  http: str = "auto", loop: str = "auto", adapters: dict[str, Path] | None = None,
                  max_loaded_adapters: int = DEFAULT_MAX_LOADED, trace: str = "off",
                  image_labelling: ImageLabelling | None = None, watermark: Any = None,
                  label_text: str | None = None) -> None:
    """Load MODEL and serve it until SIGINT/SIGTERM; then stop accepting, let the requests in flight
    finish for at most `shutdown_timeout` seconds, cancel the rest and exit. `trace`: off, console or
    otlp (common/tracing.py); every log line of a request names its x-request-id either way."""
    import uvicorn

    from genforge.common.tracing import setup_tracing
    from genforge.serve.options import exposure_warning
    from genforge.serve.tracing import log_request_ids

    ours = logging.getLogger("genforge")
    if not ours.handlers:  # uvicorn configures its own loggers only: ours (alerts, engine faults) print like its
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)

    if not Path(model).exists():
        raise ConfigError(f"model not found: {model} (expected a run directory or a Hugging Face model folder)",
                          param="model")
    for flag, value in (("--shutdown-timeout", shutdown_timeout), ("--header-timeout", header_timeout),
                        ("--body-timeout", body_timeout), ("--keep-alive", keep_alive)):
        if not value > 0:
            raise ConfigError(f"{flag} {value}: must be > 0 seconds", param=flag[2:].replace("-", "_"))
    setup_tracing(trace)
    log_request_ids()
    warning = exposure_warning(host, list(api_keys or []))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_app(model, served_model_name=served_model_name, max_model_len=max_model_len, dtype=dtype,
                     max_batch_size=max_batch_size, max_queue=max_queue, api_keys=api_keys,
                     decode=decode, request_timeout=request_timeout, body_timeout=body_timeout,
                     limit_concurrency=limit_concurrency, kv_cache_bytes=kv_cache_bytes,
                     stream_interval=stream_interval, app_config=app_config, adapters=adapters,
                     max_loaded_adapters=max_loaded_adapters, image_labelling=image_labelling,
                     watermark=watermark, label_text=label_text)
    sock = listen(host, port)
    config = uvicorn_config(app, header_timeout=header_timeout, keep_alive=keep_alive,
                            limit_concurrency=limit_concurrency, shutdown_timeout=shutdown_timeout,
                            root_path=root_path, http=http, loop=loop)
    shown = served_model_name or default_served_name(model)
    service = app.app.state.service
    if service is not None:
        print("engine: " + " ".join(f"{k}={v}" for k, v in service.in_effect().items()), flush=True)
        if service.labelling.active:
            print(f"labelling: {service.labelling.start_line()}", flush=True)
        if service.app is not None:
            print(f"app layer: {service.app.describe()}", flush=True)
            if service.app.rag_on and service.max_model_len < RAG_MIN_CONTEXT:
                print(f"warning: the model's context is {service.max_model_len} tokens: retrieved sources are "
                      "added only as far as they fit beside the answer, often not at all (the response then "
                      "has no `sources`)", file=sys.stderr, flush=True)
    alerts = app.app.state.alerts
    if alerts is not None:
        spec = alerts.spec
        print(f"alerts: detector={spec.detector} threshold={spec.threshold:g} interval={spec.interval_s:g}s "
              f"window={spec.window} consecutive={spec.consecutive}", flush=True)
    if service is not None and service.adapters is not None:
        print(f"adapters: {', '.join(service.adapters.names)} (at most {service.adapters.max_loaded} in memory)",
              flush=True)
    print(f"serving {shown} on http://{host}:{port}{root_path}/v1", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
