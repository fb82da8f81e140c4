"""The HTTP server's own limits: uvicorn's settings and the one thing uvicorn lacks.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`), but a client that connects and
then sends its request headers a byte at a time (or nothing at all) holds the connection forever,
and only h11 bounds the size of a header block. `HeaderLimits` closes such a connection with a 408
when a request's headers are not complete within `header_timeout` seconds of its first byte (or of
the connection, for the first request), and with a 431 when they pass `MAX_HEADER_BYTES`. The body
has its own time limit, in serve/gate.py.

Protocol and loop: httptools + uvloop when installed (uvicorn's own "auto", what vLLM runs), else
h11 + asyncio (`--http`, `--loop`). On the 2-core benchmark machine the two did not differ beyond the
noise in server CPU time per streamed token (~0.5 ms with the engine's share included).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5.0
MAX_HEADER_BYTES = 32 * 1024  # the whole request head; h11 answers 400 above it

_BODY_408 = json.dumps({"error": {"message": "request headers did not arrive in time", "type":
                                  "invalid_request_error", "param": None, "code": "request_timeout"}}).encode()
_RESPONSE_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: " + str(len(_BODY_408)).encode() + b"\r\n\r\n" + _BODY_408)
_BODY_431 = json.dumps({"error": {"message": f"request headers are larger than {MAX_HEADER_BYTES} bytes", "type":
                                  "invalid_request_error", "param": None, "code": "headers_too_large"}}).encode()
_RESPONSE_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: " + str(len(_BODY_431)).encode() + b"\r\n\r\n" + _BODY_431)


class HeaderLimits:
    """A deadline and a size cap for each request's header block, mixed into uvicorn's protocols."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S  # set per server by `protocol_class`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._arm()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._arm()  # the first bytes of a new request: its head must be complete in time
        super().data_received(data)
        if not self._between_requests():
            self._disarm()  # the parser produced the request: headers are complete
            self._head_bytes = 0
        elif not self.transport.is_closing():
            # still no complete head: every byte so far is header (httptools has no cap of its own)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self.transport.write(_RESPONSE_431)
                self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle now: uvicorn's keep-alive timeout takes over until the next bytes

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.write(_RESPONSE_408)
            self.transport.close()


HTTP_IMPLS = ("auto", "h11", "httptools")
LOOPS = ("auto", "asyncio", "uvloop")


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def protocol_class(header_timeout: float, http: str = "auto") -> type:
    """uvicorn's protocol (httptools when installed, else h11) with this server's header limits
    (uvicorn takes a class, not an instance)."""
    if http == "httptools" or (http == "auto" and _installed("httptools")):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        base = H11Protocol
    return type(f"HeaderLimited{base.__name__}", (HeaderLimits, base), {"header_timeout": header_timeout})


def pick_loop(loop: str = "auto") -> str:
    return "uvloop" if loop == "uvloop" or (loop == "auto" and _installed("uvloop")) else "asyncio"


def uvicorn_config(app: Any, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                   keep_alive: float = DEFAULT_KEEP_ALIVE_S, limit_concurrency: int | None = None,
                   shutdown_timeout: float | None = None, root_path: str = "", log_level: str = "info",
                   http: str = "auto", loop: str = "auto") -> Any:
    """uvicorn.Config with genforge's limits (see the module docstring and `genforge serve --help`)."""
    import uvicorn

    # uvicorn's own concurrency limit answers a plain-text 503 and counts idle keep-alive
    # connections; the gate enforces `limit_concurrency` per request with an OpenAI-style 503, so
    # uvicorn's is only a backstop against connection floods, set well above it.
    backstop = None if limit_concurrency is None else 2 * limit_concurrency + 64
    return uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                          http=protocol_class(header_timeout, http), loop=pick_loop(loop),
                          timeout_keep_alive=int(max(1, keep_alive)),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=backstop,
                          timeout_graceful_shutdown=shutdown_timeout, root_path=root_path)
