"""What every genforge ASGI app shares (the model server, the registry server, the upstream gateway):
OpenAI-shaped error handlers, binding the port before uvicorn starts, and the --dtype choice.
"""

from __future__ import annotations

import logging
import re
import socket
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from genforge.common.errors import ConfigError, GenforgeError
from genforge.serve.gate import RETRY_AFTER_S
from genforge.serve.protocol import error_body

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- validation errors -> OpenAI 400s

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|dict|list|function-.*|constrained-.*|.*\[.*\])$")


_TYPE_MISMATCH = re.compile(r"(_type|_parsing|_from_float|^missing)$")


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
    # In a union (stop: str | list[str]) every alternative reports; the one whose type fitted and
    # whose value did not ("stop[1]: at most 256 characters") says more than "not a string".
    first = next((e for e in errors if not _TYPE_MISMATCH.search(str(e.get("type", "")))), errors[0])
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


def install_error_handlers(app: FastAPI) -> None:
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
        error_id = f"err-{uuid.uuid4().hex[:12]}"
        log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(f"internal server error (error id {error_id}); the server log has the "
                                       f"details", "server_error"), status_code=500)



def torch_dtype(dtype: str | None) -> Any:
    import torch

    # "auto": models.lm.resolve_dtype decides (bf16 on CUDA and on CPUs with native bf16)
    choices = {None: "auto", "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ConfigError(f"--dtype: {dtype!r} is not one of auto, float32, bfloat16", param="dtype")
    return choices[dtype]



def listen(host: str, port: int) -> socket.socket:
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
