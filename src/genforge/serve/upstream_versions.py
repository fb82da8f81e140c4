"""The upstreams one gateway forwards to, and which requests each one gets.

    genforge serve --upstream http://a:8000 --canary-upstream http://b:8000=10% --shadow-upstream http://c:8000

The roles and their rules are the registry server's (serve/versions.py): the canary takes `share`
percent of requests, sticky by the request's route key (the x-genforge-route-key header, else the
body's `user`; versions.takes_canary); the shadow gets a copy of every request, recorded and dropped
(serve/shadow.py); POST /admin/promote and /admin/rollback switch the primary without a restart, and
the previous primary is kept for the rollback. What differs: an upstream is a URL, not a loaded model,
so taking one on is opening a connection pool, and its health is the engine's own /health. A canary
found down (by a health check, or because a request to it could not connect) gets no traffic, the
primary answers instead, until a health check finds it up again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genforge.common.errors import ConfigError
from genforge.serve.versions import NothingToSwitch, VersionLoadFailed, parse_canary, takes_canary

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 5.0  # how often a canary's health is checked (a down one comes back within this)
RETIRE_WAIT_S = 900.0  # how long an upstream that left every role waits for its last requests


def check_url(url: str, flag: str) -> str:
    """URL without a trailing slash; ConfigError (one line) unless it is an http(s) URL with a host."""
    text = str(url).strip()
    parts = urllib.parse.urlsplit(text)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is not a number, or out of range
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise ConfigError(f"{flag} {url!r}: expected the http(s) URL of an OpenAI-compatible server, e.g. "
                          "http://127.0.0.1:8000", param=flag[2:].replace("-", "_"))
    return text.rstrip("/")


def parse_canary_upstream(text: str) -> tuple[str, float]:
    """'http://b:8000=10%' -> ('http://b:8000', 10.0): the registry canary's parse rule, then the URL checked."""
    url, share = parse_canary(text, flag="--canary-upstream", form="URL=SHARE%, e.g. http://127.0.0.1:8001=10%")
    return check_url(url, "--canary-upstream"), share


@dataclass(eq=False)
class Upstream:
    """One upstream engine: its service (serve/upstream.py), its metrics and the requests it runs now."""

    number: int  # 1, 2, ... in the order the upstreams were named: the genforge:serving_version gauge's value
    service: Any  # serve.upstream.UpstreamService
    metrics: Any  # serve.metrics.ServeMetrics, exported with a `version` label (the URL)
    in_flight: int = 0
    ok: bool = True  # by the last health check or connection attempt

    @property
    def ref(self) -> str:
        return self.service.url

    def describe(self) -> dict:
        return {"version": self.number, "ref": self.ref, "ok": self.ok, "in_flight": self.in_flight}


class UpstreamSet:
    """The roles, with the interface the admin routes drive (serve/version_routes.py). Routing reads
    them without a lock (one event loop); changes are serialized by `lock`."""

    def __init__(self, build: Callable[[str, int], Upstream], primary: str, *, name: str,
                 canary: tuple[str, float] | None = None, shadow: str | None = None,
                 on_switch: Callable[[str], None] | None = None):
        self._build, self.name = build, name
        self._numbers = itertools.count(1)
        self.loaded: dict[str, Upstream] = {}
        self.primary: Upstream = self._get(primary)
        self.previous: Upstream | None = None
        self.canary: Upstream | None = None
        self.canary_share = 0.0
        self.shadow: Upstream | None = None
        for flag, url in (("--canary-upstream", canary[0] if canary else None), ("--shadow-upstream", shadow)):
            if url is not None and url == primary:
                raise ConfigError(f"{flag} {url}: that is the primary (--upstream); name another engine",
                                  param=flag[2:].replace("-", "_"))
        if canary is not None:
            self.canary, self.canary_share = self._get(canary[0]), canary[1]
        if shadow is not None:
            self.shadow = self._get(shadow)
        self.lock = asyncio.Lock()
        self.on_switch = on_switch or (lambda action: None)
        self._retiring: set[asyncio.Task] = set()

    def _get(self, url: str) -> Upstream:
        if url not in self.loaded:
            self.loaded[url] = self._build(url, next(self._numbers))
        return self.loaded[url]

    # ------------------------------------------------------------------ routing
    def pick(self, route_key: str | None) -> tuple[Upstream, str]:
        """(the upstream a request goes to, its role); a canary known to be down takes nothing."""
        if self.canary is not None and self.canary.ok and takes_canary(route_key, self.canary_share):
            return self.canary, "canary"
        return self.primary, "primary"

    def mark_down(self, upstream: Upstream, why: str) -> None:
        if upstream.ok:
            log.warning("upstream %s is down (%s): it gets no traffic until a health check finds it up", upstream.ref,
                        why)
        upstream.ok = False

    async def check_health(self, only: list[Upstream] | None = None) -> None:
        """Ask each upstream (or those in `only`) for its health, all at once; their `ok` follows."""
        targets = only if only is not None else list(self.loaded.values())
        results = await asyncio.gather(*(u.service.health() for u in targets))
        for upstream, result in zip(targets, results):
            if result["ok"] and not upstream.ok:
                log.info("upstream %s is up again", upstream.ref)
            upstream.ok = bool(result["ok"])

    async def _healthy(self, url: str, action: str) -> Upstream:
        """The upstream at URL, known or new, after its health check; VersionLoadFailed when it is down."""
        target = self._get(url)
        await self.check_health([target])
        if not target.ok:
            self._retire_unused()
            raise VersionLoadFailed(f"cannot {action} {url}: it does not answer its /health with 200; still serving "
                                    f"{self.primary.ref}", param="version")
        return target

    # ------------------------------------------------------------------ switching (under self.lock)
    async def promote(self, ref: str | None) -> dict:
        if ref is None:
            if self.canary is None:
                raise NothingToSwitch('nothing to promote: no canary upstream; name one ({"version": "URL"}) or '
                                      "start with --canary-upstream", code="nothing_to_promote")
            url = self.canary.ref
        else:
            url = check_url(ref, "version")
            if url == self.primary.ref:
                raise NothingToSwitch(f"{url} is already the primary", param="version", code="nothing_to_promote")
        target = await self._healthy(url, "promote")
        old = self.primary
        self.primary, self.previous = target, old
        if self.canary is target:
            self.canary, self.canary_share = None, 0.0
        return self._switched("promote", old)

    async def rollback(self) -> dict:
        if self.previous is None:
            raise NothingToSwitch(f"nothing to roll back to: this gateway has forwarded only to {self.primary.ref} "
                                  "since it started", code="nothing_to_roll_back")
        old = self.primary
        self.primary = await self._healthy(self.previous.ref, "roll back to")
        self.previous = old
        return self._switched("rollback", old)

    async def set_canary(self, ref: str | None, share: float) -> dict:
        if ref is None:
            self.canary, self.canary_share = None, 0.0
        else:
            url = check_url(ref, "version")
            if url == self.primary.ref:
                raise ConfigError(f"{url} is the primary; a canary must be another upstream", param="version")
            self.canary, self.canary_share = self._get(url), share
            await self.check_health([self.canary])
        self._retire_unused()
        self.on_switch("canary")
        return {"action": "canary", **self.status()}

    def _switched(self, action: str, old: Upstream) -> dict:
        self._retire_unused()
        self.on_switch(action)
        log.info("%s: primary upstream %s (was %s)", action, self.primary.ref, old.ref)
        return {"action": action, **self.status()}

    def _retire_unused(self) -> None:
        keep = {id(u) for u in (self.primary, self.previous, self.canary, self.shadow) if u is not None}
        for url, upstream in list(self.loaded.items()):
            if id(upstream) not in keep:
                del self.loaded[url]
                task = asyncio.get_running_loop().create_task(self._retire(upstream))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(upstream: Upstream) -> None:
        """Close an upstream's connections once its requests in flight have ended."""
        deadline = time.monotonic() + RETIRE_WAIT_S
        while upstream.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await upstream.service.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for upstream in self.loaded.values():
            await upstream.service.close()

    # ------------------------------------------------------------------ reading
    def status(self) -> dict:
        def one(u: Upstream | None) -> dict | None:
            return u.describe() if u is not None else None

        canary = one(self.canary)
        if canary is not None:
            canary["share"] = self.canary_share
            canary["traffic"] = self.canary.ok and self.canary_share > 0  # a canary that is down takes none
        return {"model": self.name, "primary": one(self.primary), "canary": canary, "shadow": one(self.shadow),
                "previous": one(self.previous), "loaded": list(self.loaded)}
