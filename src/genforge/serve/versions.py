"""The registry versions one server runs, and which requests each one gets.

    genforge serve --model nano@production --canary nano@4=10% --shadow nano@5

Roles: the primary answers every request the canary does not take; the canary takes `share`
percent of them, chosen by a hash of the request's route key (the x-genforge-route-key header, else
the body's `user`), so one user stays on one version, on every replica; the shadow gets a copy of
every request and its answer is recorded, never returned (serve/shadow.py); the previous primary
stays loaded after a promotion, so a rollback is a pointer swap rather than a model load.

Each version is its own `LMService` (its own engine and model): a request is handed to the service
it was routed to and finishes there, whatever is promoted meanwhile; a version that leaves every
role is shut down only once its last request has ended. A version gets traffic only after it
loaded and answered a short greedy generation (the health check); a version that fails either
leaves the serving versions as they were, and the admin call says why.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from genforge.common.errors import ConfigError, GenforgeError
from genforge.common.registry import ModelVersion, Registry, parse_ref
from genforge.models.sampling import SamplingParams

log = logging.getLogger(__name__)

ROUTE_KEY_HEADER = "x-genforge-route-key"
VERSION_HEADER = "x-genforge-model-version"
HEALTH_PROMPT = "Hello"
HEALTH_TOKENS = 2
HEALTH_TIMEOUT_S = 120.0
RETIRE_WAIT_S = 900.0  # how long a retired version waits for its last requests before it is stopped anyway


class VersionLoadFailed(GenforgeError):
    """A version could not be loaded or failed its health check; nothing was switched."""

    status = 422
    type = "version_load_failed"


class NothingToSwitch(GenforgeError):
    """promote without a canary, rollback without an earlier version, promote of the primary itself."""

    status = 409
    type = "invalid_request_error"


def parse_canary(text: str, *, flag: str = "--canary", form: str = "NAME@VERSION=SHARE%, e.g. nano@4=10%"
                 ) -> tuple[str, float]:
    """'nano@4=10%' -> ('nano@4', 10.0); ConfigError for a missing or out-of-range share. `flag` and
    `form` name the option in the message (--canary-upstream URL=SHARE% parses the same way)."""
    ref, sep, share = str(text).rpartition("=")
    if not sep or not ref:
        raise ConfigError(f"{flag} {text!r}: expected {form}", param=flag[2:].replace("-", "_"))
    return ref, check_share(share.strip().removesuffix("%"), f"{flag} {text}")


def check_share(share: Any, where: str) -> float:
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: the share {share!r} is not a number; give a percentage such as 10%",
                          param="share") from None
    if not 0 <= value <= 100:
        raise ConfigError(f"{where}: the share must be between 0 and 100 (percent of requests), got {value:g}",
                          param="share")
    return value


def route_bucket(key: str) -> float:
    """A route key's place in [0, 100): the same key lands in the same place on every replica and
    across restarts (sha256, not Python's per-process salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10000 / 100


def takes_canary(route_key: str | None, share: float) -> bool:
    """Whether a request goes to a canary that takes `share` percent: by its route key's bucket (sticky),
    or at random when the request has no key."""
    if share <= 0:
        return False
    place = route_bucket(route_key) if route_key else random.random() * 100
    return place < share


@dataclass(eq=False)
class Served:
    """One loaded version: its service (engine + model), its metrics and the requests it runs now."""

    version: ModelVersion
    service: Any  # serve.service.LMService
    metrics: Any  # serve.metrics.ServeMetrics, exported with a `version` label
    in_flight: int = 0

    @property
    def ref(self) -> str:
        return self.version.ref

    def describe(self) -> dict:
        return {"version": self.version.version, "ref": self.ref, "digest": self.version.digest,
                "in_flight": self.in_flight}


def health_check(service: Any, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """A short greedy generation through the version's own engine; RuntimeError when it does not
    produce tokens in time. Blocking: run it in a worker thread."""
    ids = service.tokenizer(HEALTH_PROMPT, add_special_tokens=True)["input_ids"] or [0]
    stream = service.engine.submit(list(ids), SamplingParams(max_new_tokens=HEALTH_TOKENS, temperature=0.0,
                                                             ignore_eos=True))
    deadline = time.monotonic() + timeout
    while not stream.done:
        if time.monotonic() > deadline:
            stream.cancel()
            raise RuntimeError(f"no answer to the health check within {timeout:g} s")
        time.sleep(0.005)
    events = stream.take()
    failed = next((ev.error for ev in events if ev.error), None)
    if failed or not any(ev.token_id is not None for ev in events):
        raise RuntimeError(f"the health check generation failed ({failed or 'no tokens'})")


class VersionSet:
    """The roles (see the module docstring). Routing reads them without a lock (one event loop);
    changes are serialized by `lock` and load models in a worker thread, so serving goes on."""

    def __init__(self, registry: Registry, build: Callable[[ModelVersion], Served], *, primary_ref: str,
                 on_switch: Callable[[str], None] | None = None):
        self.registry, self._build = registry, build
        self.name = parse_ref(primary_ref)[0]
        self.follows = primary_ref  # what /admin/reload resolves again (an alias moves under it)
        self.primary: Served | None = None
        self.previous: Served | None = None
        self.canary: Served | None = None
        self.canary_share = 0.0
        self.shadow: Served | None = None
        self.loaded: dict[int, Served] = {}
        self.lock = asyncio.Lock()
        self.on_switch = on_switch or (lambda action: None)
        self._retiring: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ loading
    def resolve(self, ref: str) -> ModelVersion:
        version = self.registry.resolve(ref)
        if version.name != self.name:
            raise ConfigError(f"{ref}: this server serves {self.name}; a canary, shadow or promotion must be a "
                              f"version of {self.name}", param="version")
        return version

    def load(self, version: ModelVersion) -> Served:
        """The version loaded, started and health-checked (blocking); VersionLoadFailed saying why not."""
        if version.version in self.loaded:
            return self.loaded[version.version]
        try:
            self.registry.files_of(version)
            served = self._build(version)
        except GenforgeError as e:
            raise self._failed(f"{version.ref} cannot be served: {e.message}", e) from e
        except Exception as e:  # a damaged weight file raises whatever its reader raises
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            raise self._failed(f"{version.ref} failed to load ({type(e).__name__}: {reason})", e) from e
        try:
            served.service.engine.start()
            health_check(served.service)
        except Exception as e:
            served.service.engine.shutdown(drain=False)
            raise self._failed(f"{version.ref} failed its health check ({e})", e) from e
        log.info("%s loaded and healthy", version.ref)
        return served

    def _failed(self, what: str, cause: Exception) -> VersionLoadFailed:
        """The error for the admin call, also logged (with the traceback) for whoever reads the log."""
        message = what + (f"; still serving {self.primary.ref}" if self.primary is not None else "")
        log.error("%s", message, exc_info=cause)
        return VersionLoadFailed(message, param="version")

    def start(self, canary: tuple[str, float] | None = None, shadow: str | None = None) -> None:
        """Load the primary (and canary, shadow) before the server takes requests (blocking)."""
        primary = self.resolve(self.follows)
        for flag, ref in (("--canary", canary[0] if canary else None), ("--shadow", shadow)):
            if ref is not None and self.resolve(ref).version == primary.version:
                raise ConfigError(f"{flag} {ref}: that is the primary ({primary.ref}); name another version",
                                  param=flag[2:])
        self.primary = self._keep(self.load(primary))
        if canary is not None:
            self.canary, self.canary_share = self._keep(self.load(self.resolve(canary[0]))), canary[1]
        if shadow is not None:
            self.shadow = self._keep(self.load(self.resolve(shadow)))

    def _keep(self, served: Served) -> Served:
        self.loaded[served.version.version] = served
        return served

    async def _load(self, ref: str) -> Served:
        version = await asyncio.to_thread(self.resolve, ref)
        served = await asyncio.to_thread(self.load, version)
        return self._keep(served)

    # ------------------------------------------------------------------ routing
    def pick(self, route_key: str | None) -> tuple[Served, str]:
        """(the version a request goes to, its role: primary or canary)."""
        if self.canary is not None and takes_canary(route_key, self.canary_share):
            return self.canary, "canary"
        return self.primary, "primary"

    # ------------------------------------------------------------------ switching (under self.lock)
    async def promote(self, ref: str | None) -> dict:
        if ref is None:
            if self.canary is None:
                raise NothingToSwitch(f"nothing to promote: no canary is running on this server; name a version "
                                      f'({{"version": "{self.name}@N"}}) or start one with --canary',
                                      code="nothing_to_promote")
            target = self.canary
        else:
            version = await asyncio.to_thread(self.resolve, ref)
            if version.version == self.primary.version.version:
                raise NothingToSwitch(f"{version.ref} is already the primary", param="version",
                                      code="nothing_to_promote")
            target = await self._load(ref)
        old = self.primary
        self.primary, self.previous = target, old
        if self.canary is target:
            self.canary, self.canary_share = None, 0.0
        moved = await self._move_alias(target, expect=old)
        self._retire_unused()
        self.on_switch("promote")
        log.info("promoted %s (was %s)", target.ref, old.ref)
        return {"action": "promote", **self.status(), **moved}

    async def rollback(self) -> dict:
        if self.previous is None:
            raise NothingToSwitch(f"nothing to roll back to: this server has served only {self.primary.ref} "
                                  "since it started", code="nothing_to_roll_back")
        old = self.primary
        self.primary, self.previous = self.previous, old
        moved = await self._move_alias(self.primary, expect=old)
        self._retire_unused()
        self.on_switch("rollback")
        log.info("rolled back to %s (was %s)", self.primary.ref, old.ref)
        return {"action": "rollback", **self.status(), **moved}

    async def reload(self) -> dict:
        """Resolve what the server follows again (another replica may have moved the alias)."""
        version = await asyncio.to_thread(self.resolve, self.follows)
        changed = version.version != self.primary.version.version
        if changed:
            target = await self._load(version.ref)
            self.primary, self.previous = target, self.primary
            if self.canary is target:
                self.canary, self.canary_share = None, 0.0
            self._retire_unused()
            self.on_switch("reload")
            log.info("reload: %s now resolves to %s", self.follows, target.ref)
        return {"action": "reload", "changed": changed, **self.status()}

    async def set_canary(self, ref: str | None, share: float) -> dict:
        if ref is None:
            self.canary, self.canary_share = None, 0.0
        else:
            version = await asyncio.to_thread(self.resolve, ref)
            if version.version == self.primary.version.version:
                raise ConfigError(f"{version.ref} is the primary; a canary must be another version", param="version")
            self.canary, self.canary_share = await self._load(ref), share
        self._retire_unused()
        self.on_switch("canary")
        return {"action": "canary", **self.status()}

    async def _move_alias(self, target: Served, *, expect: Served) -> dict:
        """When the server follows an alias, a promotion or rollback moves that alias in the registry,
        so the other replicas pick it up on their next reload."""
        name, selector = parse_ref(self.follows)
        if selector.isdigit() or selector == "latest":
            return {}
        ok = await asyncio.to_thread(self.registry.move_alias, name, selector, target.version.version,
                                     expect=expect.version.version)
        if not ok:
            log.warning("%s was moved by someone else meanwhile; left as it is", self.follows)
        return {"alias": {"name": self.follows, "moved": ok, "version": target.version.version}}

    def _retire_unused(self) -> None:
        keep = {id(s) for s in (self.primary, self.previous, self.canary, self.shadow) if s is not None}
        for number, served in list(self.loaded.items()):
            if id(served) not in keep:
                del self.loaded[number]
                task = asyncio.get_running_loop().create_task(self._retire(served))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(served: Served) -> None:
        """Stop a version once its requests in flight have ended (they finish on it, not elsewhere)."""
        deadline = time.monotonic() + RETIRE_WAIT_S
        while served.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await served.service.shutdown(timeout=5.0)
        log.info("%s stopped (no longer primary, previous, canary or shadow)", served.ref)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for served in {id(s): s for s in self.loaded.values()}.values():
            await served.service.shutdown(timeout=1.0)

    # ------------------------------------------------------------------ reading
    def status(self) -> dict:
        def one(s: Served | None) -> dict | None:
            return s.describe() if s is not None else None

        canary = one(self.canary)
        if canary is not None:
            canary["share"] = self.canary_share
        return {"model": self.name, "follows": self.follows, "primary": one(self.primary),
                "canary": canary, "shadow": one(self.shadow), "previous": one(self.previous),
                "loaded": sorted(self.loaded)}
