"""One request's side of the engine: its event stream and the hooks the engine calls.

`RequestStream` carries the events of one sequence from the scheduler thread to its consumer:
blocking iteration (CLI, tests), `async for`, or `take()` with a wake-up event shared by all of
an HTTP request's sequences (serve/streaming.py). `EngineObserver` is what metrics subscribe to.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from genforge.models.generation import Sequence, TokenEvent

if TYPE_CHECKING:
    from genforge.serve.engine import Engine

_ids = itertools.count(1)


class EngineObserver:
    """Hooks for metrics (the server subclasses this and maps them to Prometheus).

    Called from the scheduler thread: keep them quick; they must be thread-safe.
    """

    def on_first_token(self, seconds: float) -> None:
        """Time from submit to the first token of a request (as the engine sees it)."""

    def on_admit(self, queue_seconds: float) -> None:
        """A request left the queue for a batch slot after waiting `queue_seconds`."""

    def on_token(self, seconds: float) -> None:
        """Time between two consecutive tokens of one request."""

    def on_finish(self, *, e2e_seconds: float, prompt_tokens: int, completion_tokens: int,
                  finish_reason: str) -> None:
        """A request ended (stop, length or abort)."""

    def on_step(self, *, batch_size: int, num_waiting: int, seconds: float) -> None:
        """One scheduler iteration (admissions + one decode step) took `seconds`."""


class RequestStream:
    """The events of one request, in order; the last has finish_reason set."""

    def __init__(self, engine: Engine, seq: Sequence):
        self.id = f"req-{next(_ids)}"
        self._engine = engine
        self._seq = seq
        self._events: collections.deque[TokenEvent] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aevent: asyncio.Event | None = None
        self._done = False  # the final event has been pushed
        self.cancelled = False
        self.error_status = 500  # the HTTP status an engine error on this stream maps to
        self.submitted = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason: str | None = None
        try:  # submitted from a coroutine: wake-ups go to that loop
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self._seq.tokens)

    @property
    def done(self) -> bool:
        """The final event has been produced (it may not have been read yet)."""
        return self._done

    def cancel(self) -> None:
        """Stop generating: a queued request leaves the queue now (its final event pushed), a
        running one frees its slot and KV cache at the next step."""
        if not self._done:
            self._engine._cancel(self)

    # -- producer side (scheduler thread) ---------------------------------------------------------
    def _push(self, ev: TokenEvent) -> None:
        now = time.perf_counter()
        if ev.token_id is not None:
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        if ev.finish_reason is not None:
            self.finish_reason, self.finished_at = ev.finish_reason, now
        with self._cond:
            self._events.append(ev)
            if ev.finish_reason is not None:
                self._done = True
            self._cond.notify()

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._aevent = asyncio.Event()
            self._loop = loop

    # -- consumer side ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while True:
                with self._cond:
                    while not self._events:
                        self._cond.wait()
                    ev = self._events.popleft()
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            if self.finish_reason is None:  # the consumer stopped early
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        self._bind(asyncio.get_running_loop())
        try:
            while True:
                self._aevent.clear()  # clear, then drain: a wake-up after the drain is kept
                while self._events:
                    ev = self._events.popleft()
                    yield ev
                    if ev.finish_reason is not None:
                        return
                await self._aevent.wait()
        finally:
            if self.finish_reason is None or self._events:
                self.cancel()

    def share_wakeup(self, event: asyncio.Event) -> None:
        """Wake `event` (one per HTTP request, shared by its choices) instead of this stream's own;
        read with `take()`. Call on the event loop before the first `take()`."""
        self._loop, self._aevent = asyncio.get_running_loop(), event

    def take(self) -> list[TokenEvent]:
        """Every event produced so far and not yet taken (non-blocking)."""
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def text(self) -> str:
        """Block until done; the whole generated text."""
        return "".join(ev.text for ev in self)


def _set_all(events: list[asyncio.Event]) -> None:
    for ev in events:
        ev.set()
