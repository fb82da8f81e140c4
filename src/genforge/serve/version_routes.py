"""What the registry server (serve/versioned_app.py) and the upstream gateway (serve/upstream_app.py)
share to route requests among versions: the admin routes, the routing metrics, one exposition over
every version's metrics, and the in-flight count of a version's streams.

The admin routes drive a roles object (versions.VersionSet, upstream_versions.UpstreamSet) that has
`lock`, `status()`, `promote(ref | None)`, `rollback()`, `set_canary(ref | None, share)` and, where
the server follows a registry alias, `reload()`.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from pydantic import BaseModel, ConfigDict

from genforge.serve.metrics import ServeMetrics
from genforge.serve.versions import check_share


class PromoteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = None


class CanaryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None
    share: float = 10.0


class MergedRegistries:
    """One exposition over several registries, each sample given extra labels (the version's)."""

    def __init__(self, sources: Callable[[], list[tuple[CollectorRegistry, dict[str, str]]]]):
        self.sources = sources

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for registry, extra in self.sources():
            for fam in registry.collect():
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                out.samples += [Sample(s.name, {**s.labels, **extra}, s.value, s.timestamp, s.exemplar)
                                for s in fam.samples]
        return list(families.values())


class RouterMetrics:
    def __init__(self, metrics: ServeMetrics):
        r, m = metrics.registry, metrics.model_name
        self.requests = Counter("genforge:version_requests", "Requests routed to each version, by role (primary, "
                                "canary, shadow; shadow_dropped: a copy not sent because the shadow was busy).",
                                ["model_name", "version", "role"], registry=r)
        self.shadow_latency = Counter("genforge:shadow_seconds", "Time the shadow spent on its copies.",
                                      ["model_name", "version"], registry=r)
        self.shadow_errors = Counter("genforge:shadow_errors", "Shadow copies that failed.", ["model_name", "version"],
                                     registry=r)
        self.switches = Counter("genforge:version_switches", "Changes of the serving versions by action (promote, "
                                "rollback, reload, canary).", ["model_name", "action"], registry=r)
        self.serving = Gauge("genforge:serving_version", "The version number each role serves (0: none).",
                             ["model_name", "role"], registry=r)
        self.m = m

    def show_roles(self, roles: Any, number: Callable[[Any], int]) -> None:
        """Each role's gauge: `number` of what serves it (0: none)."""
        for role in ("primary", "canary", "shadow", "previous"):
            served = getattr(roles, role)
            self.serving.labels(self.m, role).set(number(served) if served is not None else 0)

    def switched(self, action: str, roles: Any, number: Callable[[Any], int]) -> None:
        self.switches.labels(self.m, action).inc()
        self.show_roles(roles, number)

    def shadow_recorder(self, version: str) -> Callable[[str, float], None]:
        """The shadow's `on_result`: its copies, time and errors under `version`."""
        def record(outcome: str, seconds: float) -> None:
            self.requests.labels(self.m, version, "shadow_dropped" if outcome == "dropped" else "shadow").inc()
            self.shadow_latency.labels(self.m, version).inc(seconds)
            if outcome == "error":
                self.shadow_errors.labels(self.m, version).inc()
        return record


def add_admin_routes(app: FastAPI, versions: Any, *, reload: bool = True) -> None:
    """GET /admin/versions, POST /admin/promote, /admin/rollback, /admin/canary (and /admin/reload when
    `reload`) over `versions` (see the module docstring); switches are serialized by its lock."""

    @app.get("/admin/versions")
    async def admin_versions() -> JSONResponse:
        return JSONResponse({"object": "admin.versions", **versions.status()})

    @app.post("/admin/promote")
    async def promote(body: PromoteBody | None = None) -> JSONResponse:
        async with versions.lock:
            return JSONResponse({"object": "admin.switch", **await versions.promote(body.version if body else None)})

    @app.post("/admin/rollback")
    async def rollback() -> JSONResponse:
        async with versions.lock:
            return JSONResponse({"object": "admin.switch", **await versions.rollback()})

    if reload:
        @app.post("/admin/reload")
        async def reload_ref() -> JSONResponse:
            async with versions.lock:
                return JSONResponse({"object": "admin.switch", **await versions.reload()})

    @app.post("/admin/canary")
    async def set_canary(body: CanaryBody) -> JSONResponse:
        share = check_share(body.share, "canary share")
        async with versions.lock:
            return JSONResponse({"object": "admin.switch", **await versions.set_canary(body.version, share)})


def counted_stream(body: AsyncIterator, served: Any) -> AsyncIterator:
    """A stream's body that marks its version's request done when it ends, however it ends: also when
    the client left before the first chunk, so the body was never started (then only the collection
    of the unstarted generator can tell)."""
    ended = False

    def end() -> None:
        nonlocal ended
        if not ended:
            ended = True
            served.in_flight -= 1

    async def counted() -> AsyncIterator:
        try:
            async for chunk in body:
                yield chunk
        finally:
            end()

    stream = counted()
    weakref.finalize(stream, end)
    return stream
