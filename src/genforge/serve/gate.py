"""The pure-ASGI front door, in front of FastAPI: what must hold before any parsing happens.

    auth (every route but PUBLIC_PATHS) -> concurrency limit -> body read (size cap, time limit)
    -> JSON nesting depth -> the app;   HTTP metrics, error counts and the client-side TTFT on the way out

Every request gets an id (the client's `x-request-id` when safe, else a fresh one; serve/tracing.py),
returned in its response headers, errors included; and, when tracing is on, a root span with the
auth, validate (body read through pydantic's validation) and respond (first response byte to last)
spans under it.

The route is judged by the path the router will match (the request path without the ASGI
`root_path`), so mounting the app under a prefix or serving it with `--root-path` cannot move a
route out of the auth check: anything that is not exactly a public path needs the key, unknown
routes included.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from typing import Any

from genforge.common import tracing
from genforge.common.errors import AuthError
from genforge.data.documents import MAX_FILE_BYTES
from genforge.serve.console import is_console_path
from genforge.serve.metrics import ServeMetrics
from genforge.serve.protocol import error_body
from genforge.serve.tracing import REQUEST_ID_HEADER, request_id_of, request_id_var

PUBLIC_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no key
ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/images/generations",
                       "/v1/images/edits", "/v1/embeddings", "/v1/features", "/v1/rag/documents", "/v1/rag/search",
                       "/health", "/metrics", "/openapi.json", "/"})
DEFAULT_MAX_BODY_BYTES = 1 << 20  # OpenAI-sized requests are far smaller; this bounds parser memory
DEFAULT_BODY_TIMEOUT_S = 30.0  # a client that trickles its body holds a connection, not a server
# A refused body is still read (and dropped) up to this much before the 413: closing a socket with
# unread data makes the kernel send a reset, and the client would see "connection reset" instead
# of the error. Beyond it (or past the body timeout) the connection is closed unread.
DRAIN_LIMIT_BYTES = 16 << 20
# Routes that take files (multipart/form-data, serve/documents.py): two files at the per-file cap and
# the form around them, and no JSON depth check (a document's brackets are not JSON).
UPLOAD_PATHS = frozenset({"/v1/rag/documents"})
MAX_UPLOAD_BYTES = 2 * MAX_FILE_BYTES + (1 << 20)
MAX_JSON_DEPTH = 32  # OpenAI bodies nest about 6 deep; Python's json recurses, so bound it first
RETRY_AFTER_S = 1  # what a 503 asks clients to wait; the queue drains in about a decode step per token

# Scope keys the service sets / reads (plain strings: the ASGI scope is a dict shared by both).
ARRIVAL = "genforge.arrival"
FIRST_TOKEN = "genforge.first_token"  # "pending" before the body write that shows the first token
ERROR_KIND = "genforge.error_kind"  # overrides the kind derived from the status
REQUEST_ID = "genforge.request_id"
VALIDATE_FROM = "genforge.validate_from"  # perf_counter when the body read began (POST)
VALIDATED = "genforge.validated"  # set by the route once pydantic accepted the body

_ERROR_KINDS = {400: "invalid_request", 401: "auth", 404: "not_found", 405: "invalid_request",
                408: "timeout", 413: "too_large", 422: "invalid_request", 499: "client_disconnected",
                500: "internal", 503: "overloaded", 504: "timeout"}
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_BRACKETS_ONLY = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets: deleted


def route_path(scope: dict) -> str:
    """The path the router matches: `path` without `root_path` (as Starlette computes it)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root):]
    return path or "/"


def validated(scope: dict) -> None:
    """Called by a route on entry: the request passed every check; its validate span ends now."""
    started = scope.get(VALIDATE_FROM)
    if started is not None and tracing.enabled():
        scope[VALIDATED] = True
        tracing.record_span("validate", started, time.perf_counter())


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body`'s arrays/objects nest deeper than `limit` (strings skipped; C-speed passes)."""
    structure = _JSON_STRING.sub(b"", body).translate(None, _BRACKETS_ONLY)
    if structure.count(b"[") + structure.count(b"{") <= limit:
        return False  # the usual case: too few brackets to nest that deep at all
    depth = 0
    for byte in structure:
        depth += 1 if byte in (0x5B, 0x7B) else -1
        if depth > limit:
            return True
    return False


async def send_json(send: Any, status: int, body: dict, headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": raw, "more_body": False})


class Gate:
    """See the module docstring. `api_keys` empty = no auth (the caller warns when that is exposed)."""

    def __init__(self, app: Any, *, api_keys: list[str], max_body_bytes: int, metrics: ServeMetrics,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S, limit_concurrency: int | None = None):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes
        self.body_timeout, self.limit = body_timeout, limit_concurrency
        self.keys = [k.encode() for k in api_keys]
        self.in_flight = 0

    @property
    def state(self) -> Any:
        """The FastAPI app's state (service, metrics): tests and embedders reach them here."""
        return self.app.state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, responded = time.perf_counter(), 0, None
        scope[ARRIVAL] = start
        metrics = self.metrics
        rid = scope[REQUEST_ID] = request_id_of(scope["headers"])
        rid_header = (REQUEST_ID_HEADER, rid.encode())
        token = request_id_var.set(rid)  # this request's task: its log lines carry the id

        async def send_(message: dict) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], time.perf_counter()
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)
            if message["type"] == "http.response.body" and scope.get(FIRST_TOKEN) == "pending":
                # stamped after the write returned: the token is on its way to the client now
                scope[FIRST_TOKEN] = "sent"
                metrics.observe_ttft(time.perf_counter() - start)

        path = route_path(scope)
        endpoint = path if path in ENDPOINTS else "other"
        method = scope["method"]
        with tracing.server_span(f"{method} {path}" if path in ENDPOINTS else method, scope["headers"],
                                 {"http.request.method": method, "url.path": path,
                                  "genforge.request_id": rid}) as root:
            try:
                await self._handle(scope, path, receive, send_)
            finally:
                request_id_var.reset(token)
                # 499 (nginx's "client closed request"): the client left before any response started.
                final = status or 499
                end = time.perf_counter()
                metrics.observe_http(endpoint, final, end - start)
                kind = None
                if final >= 400:
                    kind = scope.get(ERROR_KIND) or _ERROR_KINDS.get(final, f"http_{final}")
                    metrics.observe_error(kind)
                if root is not None:
                    self._end_trace(root, scope, path, final, kind, responded, end)

    @staticmethod
    def _end_trace(root: Any, scope: dict, path: str, status: int, kind: str | None, responded: float | None,
                   end: float) -> None:
        if status >= 400 and scope.get(VALIDATE_FROM) is not None and not scope.get(VALIDATED):
            # refused before the route (body too large or too deep, pydantic's 400): validation failed
            tracing.record_span("validate", scope[VALIDATE_FROM], responded or end, error=f"HTTP {status}")
        if responded is not None:
            tracing.record_span("respond", responded, end, {"http.response.status_code": status})
        attrs: dict[str, Any] = {"http.response.status_code": status}
        if path in ENDPOINTS:
            attrs["http.route"] = path
        if kind is not None:
            attrs["error.type"] = kind
        # as OTel's HTTP conventions say for a server: a 4xx is the client's error, not the span's
        tracing.annotate(root, attrs, error=f"HTTP {status}" if status >= 500 else None)

    def _checked(self, scope: dict) -> bool:
        if not tracing.enabled():
            return self._authorized(scope)
        started = time.perf_counter()
        ok = self._authorized(scope)
        tracing.record_span("auth", started, time.perf_counter(), {"genforge.auth.ok": ok},
                            error=None if ok else "invalid or missing API key")
        return ok

    def _authorized(self, scope: dict) -> bool:
        auth = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # compare against every key in constant time, so timing reveals neither key nor position
        return any([hmac.compare_digest(token.strip(), k) for k in self.keys])

    async def _handle(self, scope: dict, path: str, receive: Any, send: Any) -> None:
        public = path in PUBLIC_PATHS or is_console_path(path)
        if self.keys and not public and not self._checked(scope):
            err = AuthError("invalid or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")
            return await send_json(send, 401, err.to_openai(), [(b"www-authenticate", b"Bearer")])
        if public or self.limit is None:
            return await self._admitted(scope, receive, send)
        if self.in_flight >= self.limit:
            body = error_body(f"the server is at its limit of {self.limit} concurrent requests; retry later",
                              "server_overloaded", code="too_many_requests")
            return await send_json(send, 503, body, [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.in_flight += 1
        try:
            await self._admitted(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _admitted(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["method"] in ("POST", "PUT", "PATCH"):
            scope[VALIDATE_FROM] = time.perf_counter()
            receive = await self._read_body(scope, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def _read_body(self, scope: dict, receive: Any, send: Any) -> Any:
        upload = route_path(scope) in UPLOAD_PATHS
        limit = max(self.max_body, MAX_UPLOAD_BYTES) if upload else self.max_body
        message = (f"the upload exceeds the limit of {limit / 2**20:.0f} MB per request ({MAX_FILE_BYTES / 2**20:.0f} "
                   "MB per file); upload the files in several requests" if upload
                   else f"request body exceeds the limit of {limit} bytes")
        too_big = error_body(message, param=None, code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                await send_json(send, 400, error_body("Content-Length header is not an integer"))
                return None
            if declared_n > limit:
                if declared_n <= DRAIN_LIMIT_BYTES:
                    await self._drain(receive, time.monotonic() + self.body_timeout)
                await send_json(send, 413, too_big, [(b"connection", b"close")])
                return None
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                body = error_body(f"the request body did not arrive within {self.body_timeout:g} s",
                                  code="request_timeout")
                await send_json(send, 408, body, [(b"connection", b"close")])
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # chunked bodies declare no length: count as they arrive
                if message.get("more_body", False):
                    await self._drain(receive, deadline, size)
                await send_json(send, 413, too_big, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if upload:
            return self._replay(body, receive)
        # large bodies off the event loop: a megabyte of escapes takes ~0.1 s to scan
        too_deep = json_too_deep(body) if len(body) < 65536 else await asyncio.to_thread(json_too_deep, body)
        if too_deep:
            await send_json(send, 400, error_body(f"request body nests arrays/objects deeper than "
                                                  f"{MAX_JSON_DEPTH} levels", code="json_too_deep"))
            return None
        return self._replay(body, receive)

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        """A `receive` that hands the app the body already read, then the real channel."""
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, so disconnects still arrive

        return replay

    @staticmethod
    async def _drain(receive: Any, deadline: float, size: int = 0) -> None:
        """Read and drop the rest of a refused body (bounded in bytes and time)."""
        while size <= DRAIN_LIMIT_BYTES:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
