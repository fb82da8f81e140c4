"""`LayerSteps` in a child process (why: serve/layer_steps.py), called by name over a pipe.

The server sends `(call_id, method, args)`; the child runs each call in a thread of its own pool
(so concurrent requests still meet in one embedding batch) and answers `(call_id, ok, value)`, the
value being the result or the exception, which the server raises again: a `ContentFilteredError`
or a `StoreUnavailable` reaches the client exactly as it did in one process. The child starts with
the server, reports its start-up error (a bad regex, an unknown index, a store that is down) before
the port opens, and ends when the server closes the pipe or exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from genforge.common.errors import GenforgeError
from genforge.serve.app_config import AppConfig
from genforge.serve.layer_steps import WORKER_THREADS, LayerSteps

log = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0  # loading the embedder, opening the store (PostgreSQL may be slow to answer)


class LayerUnavailable(GenforgeError):
    """The layer's process is gone: requests that need it get a 503 until the server restarts."""

    status = 503
    type = "server_error"


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling, else an exception that does, with the same message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        if isinstance(e, GenforgeError):
            out = GenforgeError(e.message, param=e.param, code=e.code)
            out.status, out.type = e.status, e.type
            return out
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child(conn: Connection, config: AppConfig, state_dir: Path, threads: int) -> None:
    import torch

    # One thread by default: measured beside lm-nano at 16 clients, the layer cost 19% of throughput
    # with 1 and 25% with 2 (medians of 3 noisy rounds): a second thread shortens each embedding batch
    # (45 -> 26 ms for 16 turns) but competes with the engine's threads for the same cores.
    torch.set_num_threads(config.process_threads)
    _lower_priority(config.process_priority)  # before any thread starts: they inherit it
    try:
        steps = LayerSteps(config, state_dir)
    except BaseException as e:  # noqa: BLE001 - every start-up failure goes back to the server
        conn.send(("error", _portable(e)))
        return
    conn.send(("ready", steps.info))
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="genforge-app")

    def run(call_id: int, method: str, args: tuple) -> None:
        try:
            msg = (call_id, True, getattr(steps, method)(*args))
        except BaseException as e:  # noqa: BLE001 - the server raises it again
            msg = (call_id, False, _portable(e))
        try:
            with lock:
                conn.send(msg)  # pickles before it writes: a failure here leaves the pipe intact
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            with lock:
                conn.send((call_id, False, _portable(e)))
        except OSError:
            pass  # the server is gone

    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            pool.submit(run, *msg)
    except (EOFError, OSError):
        pass
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        steps.close()


def _lower_priority(priority: str) -> None:
    """`idle`: the layer's process runs only on CPU time the engine leaves (Linux SCHED_IDLE); `low`: nice 19.

    Why: the engine's threads step together, so a thread of the layer's that takes a core from one of
    them for a time slice stalls the whole step. Measured beside lm-nano at 16 clients (2 rounds
    each, medians): the layer cost 21% of throughput at normal priority, 12% at nice 19 and 6% at
    idle. The price is latency under load: the checks finish in the engine's gaps (settle ~75 ->
    ~210 ms at 16 clients), which a short answer waits for."""
    if priority == "normal":
        return
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif hasattr(os, "nice"):
        os.nice(19)


class LayerProcess:
    """Starts the child at once; `wait_ready` (before the port opens) returns its info or raises its
    start-up error, so the model can load meanwhile."""

    def __init__(self, config: AppConfig, state_dir: Path, threads: int = WORKER_THREADS):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs torch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, config, state_dir, threads), daemon=True,
                                 name="genforge-app-layer")
        self._proc.start()
        child.close()
        self._ids = itertools.count()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._gone: str | None = None
        self.info: dict | None = None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> dict:
        if self.info is not None:
            return self.info
        if not self._conn.poll(timeout):
            self.close()
            raise LayerUnavailable(f"the application layer's process did not start within {timeout:.0f} s")
        try:
            kind, value = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise LayerUnavailable("the application layer's process exited while starting (see its log above)"
                                   ) from None
        if kind == "error":
            self.close()
            raise value
        self.info = value
        threading.Thread(target=self._read, name="genforge-app-layer-reader", daemon=True).start()
        return value

    @property
    def alive(self) -> bool:
        return self._gone is None and self._proc.is_alive()

    async def call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._gone is not None:
                raise LayerUnavailable(self._gone)
            call_id = next(self._ids)
            self._pending[call_id] = (loop, fut)
            try:
                self._conn.send((call_id, method, args))
            except OSError:
                self._pending.pop(call_id)
                raise LayerUnavailable("the application layer's process has exited") from None
        return await fut

    def _read(self) -> None:
        while True:
            try:
                call_id, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                loop, fut = self._pending.pop(call_id)
            loop.call_soon_threadsafe(_settle, fut, ok, value)
        with self._lock:
            self._gone = self._gone or "the application layer's process has exited; restart the server"
            pending, self._pending = list(self._pending.values()), {}
        if self._proc.exitcode not in (None, 0):
            log.error("the application layer's process exited with code %s", self._proc.exitcode)
        for loop, fut in pending:
            loop.call_soon_threadsafe(_settle, fut, False, LayerUnavailable(self._gone))

    def close(self) -> None:
        with self._lock:
            self._gone = self._gone or "the server is shutting down"
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._conn.close()


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():  # the request was cancelled meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)
