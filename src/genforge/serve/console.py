"""The web console's routes: the page at `/`, its static files, and the JSON it asks for.

    GET /                    console/index.html (no key needed: the page asks for it, the API checks it)
    GET /console/{file}      the page's own scripts and styles, shipped in the package (no CDN)
    GET /v1/features         what this server offers, so the page shows only the views it can back
    GET /v1/run/report       the served run's report.md (404 when the model is not a genforge run)
    GET /v1/run/files/{path} a file the report links (plots, sample grids), from the run folder only

The page and its files carry no secret, so they are public; everything under /v1 keeps the server's
API key. The report's images are fetched by the page with the key and shown from blob URLs.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

from genforge.common.errors import NotFoundError

STATIC = Path(__file__).with_name("console")
CONSOLE_PREFIX = "/console/"
# What the report may link; anything else in a run folder (checkpoints, recipes) is not served.
REPORT_FILE_TYPES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".md", ".txt", ".json", ".csv"}


def is_console_path(path: str) -> bool:
    """The page and its static files: served without an API key (they hold none)."""
    return path == "/" or path.startswith(CONSOLE_PREFIX)


def run_dir_of(model_path: str | Path | None) -> Path | None:
    """The genforge run folder a served model came from (RUN or RUN/model), or None (an HF folder)."""
    if model_path is None:
        return None
    p = Path(model_path).resolve()
    for candidate in (p, p.parent):
        if (candidate / "recipe.yaml").is_file() or (candidate / "report.md").is_file():
            return candidate
    return None


def app_features(config: Any, layer: Any) -> dict[str, Any]:
    """The application layer's part of /v1/features: cache, RAG (and document upload), guard. `config`
    is the server's AppConfig; `layer` its AppLayer, None when no step runs (or not an LM)."""
    if layer is None:
        return {"cache": False, "rag": None, "guard": None, "documents": False}
    rag = config.rag
    return {"cache": layer.cache_on,
            "rag": {"index": rag.index, "k": rag.k} if layer.rag_on else None,
            "guard": config.guard.policy if layer.guard is not None else None,
            "documents": layer.rag_on}


def routing_features(name: str, keys: list, service: Any, config: Any, **extra: Any) -> dict[str, Any]:
    """/v1/features of a server that routes chat to its primary LM service: the registry server (its
    `version` in `extra`) and the upstream gateway (its `upstream`)."""
    return {"model": name, "family": "lm", "auth": bool(keys), "chat": True, "completions": True,
            "max_model_len": service.max_model_len, "adapters": [], "images": None,
            **app_features(config, service.app), "watermark": False, "detect": False, "embeddings": False,
            "metrics": True, **extra}


def install_console(app: FastAPI, features: Callable[[], dict[str, Any]], run_dir: Path | None) -> None:
    """Mount the console on `app`. `features()` is called per request: a reload or an adapter load
    changes what the server offers."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    @app.get(CONSOLE_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = STATIC / name
        if name not in {p.name for p in STATIC.iterdir()}:  # the shipped files only, nothing relative
            raise NotFoundError(f"no console file {name!r}", param="name")
        return FileResponse(path, headers={"cache-control": "no-cache"})

    @app.get("/v1/features")
    async def list_features() -> JSONResponse:
        body = {"object": "features", **features()}
        body["report"] = run_dir is not None and (run_dir / "report.md").is_file()
        return JSONResponse(body)

    @app.get("/v1/run/report")
    async def report() -> JSONResponse:
        if run_dir is None:
            raise NotFoundError("the served model is not a genforge run: it has no report", param="report")
        path = run_dir / "report.md"
        if not path.is_file():
            raise NotFoundError(f"run {run_dir.name} has no report.md yet", param="report")
        return JSONResponse({"object": "run.report", "run": run_dir.name,
                             "markdown": path.read_text(encoding="utf-8", errors="replace")})

    @app.get("/v1/run/files/{name:path}")
    async def run_file(name: str) -> Response:
        if run_dir is None:
            raise NotFoundError("the served model is not a genforge run: it has no files", param="name")
        root = run_dir.resolve()
        try:
            path = (root / name).resolve()
            found = path.is_relative_to(root) and path.suffix.lower() in REPORT_FILE_TYPES and path.is_file()
        except (OSError, ValueError):  # a NUL byte or an over-long name: no such file either way
            found = False
        if not found:
            raise NotFoundError(f"no report file {name!r} in run {run_dir.name}", param="name")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media)
