"""The batching engine: a scheduler thread over the models' continuous-batching generator.

At every iteration the scheduler drops cancelled rows, admits waiting requests while slots are
free (the generator prefills them in chunks of a token budget per step, so a burst of long
prompts does not stall the running rows for long), runs ONE batched decode step for all running
rows, and hands each request its TokenEvent. Consumers read a `RequestStream` by blocking iteration (CLI, tests)
or `async for` (the HTTP server); events cross threads through a deque plus a wake-up - a
Condition for threads, one `loop.call_soon_threadsafe` per event loop per step for asyncio.

    engine = Engine(model, tokenizer, max_batch_size=32)
    engine.start()
    stream = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64))
    for ev in stream: print(ev.text, end="")
    engine.shutdown()

Failure rules: a cancelled request leaves the queue at once (a timed-out or disconnected client
never holds a queue place); `submit_many` queues all of a request's sequences or none; a failed
step finishes every request it touched with a final event (and wakes their consumers), marks the
engine unhealthy until a later step (or an idle probe) succeeds, and gives clients a generic
message with an error id - the exception itself goes to the log only.

Test-only slowdown: GENFORGE_TEST_STEP_DELAY=SECONDS[@START[-END]] makes every scheduler iteration
sleep SECONDS, from START to END (seconds after the engine starts; a value above 1e9 is a Unix
time). It exists so that tests and benchmarks/alerts.py can inject a slowdown into a real server;
unset, it costs one attribute test per iteration.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
import uuid

import torch

from genforge.common.errors import ConfigError, GenforgeError, OverloadedError
from genforge.models.generation import BatchGenerator, Sequence, TokenEvent
from genforge.models.sampling import SamplingParams
from genforge.serve.adapters import AdapterRegistry
from genforge.serve.request_stream import EngineObserver, RequestStream, _set_all

__all__ = ["Engine", "EngineObserver", "RequestStream", "TokenEvent", "SamplingParams"]

log = logging.getLogger(__name__)


# How the decode step runs, by the name `genforge serve --decode` takes. Measured on lm-tiny, batch 16,
# one thread, tokens per CPU-second (benchmarks/decode_step.py): eager fp32 1470 / bf16 2750,
# prepacked 2200 / 3300-3600, compiled (frozen) 2200 / 4100. The compile costs ~9 s of a warm start
# (~16 s cold) and a second copy of the weights; prepacking costs nothing, so it is the default.
DECODE_MODES: dict[str, dict] = {
    "prepacked": {"prepack": True},
    "eager": {},
    "compiled": {"compile": True, "freeze": True},
}


TEST_DELAY_ENV = "GENFORGE_TEST_STEP_DELAY"


def _parse_test_delay(text: str | None) -> tuple[float, float, float] | None:
    """GENFORGE_TEST_STEP_DELAY's SECONDS[@START[-END]] -> (seconds, start, end); None when unset."""
    if not text:
        return None
    try:
        delay, _, span = text.partition("@")
        start, _, end = span.partition("-")
        out = (float(delay), float(start or 0), float(end) if end else math.inf)
    except ValueError:
        raise ConfigError(f"{TEST_DELAY_ENV}={text!r}: expected SECONDS[@START[-END]], e.g. 0.02@60-120") from None
    if out[0] < 0 or out[2] <= out[1]:
        raise ConfigError(f"{TEST_DELAY_ENV}={text!r}: the delay must be >= 0 and END after START")
    return out


def decode_options(decode: str) -> dict:
    """The Engine keyword arguments of a --decode mode; ConfigError naming the flag otherwise."""
    if decode not in DECODE_MODES:
        raise ConfigError(f"--decode {decode!r}: expected one of {', '.join(DECODE_MODES)}", param="decode")
    return dict(DECODE_MODES[decode])


class Engine:
    """Continuous batching over one model; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch_size: int = 32, max_queue: int = 256,
                 max_model_len: int | None = None, observer: EngineObserver | None = None,
                 max_prefill_tokens: int | None = None, fast: bool | None = None, compile: bool | str = False,
                 kv_cache_bytes: int | None = None, probe_interval: float = 5.0, prepack: bool = False,
                 freeze: bool = False, adapters: AdapterRegistry | None = None):
        """`compile`: torch.compile the fast decode step (True: before serving; "background": serve
        eagerly while a thread compiles; see models/fastdecode.py); `freeze` makes that compile
        constant-fold the weights (faster, a second copy); `prepack` keeps the weights only in oneDNN's
        prepacked layout (CPU, not with compile). See DECODE_MODES. `kv_cache_bytes`: the KV cache's
        memory budget, passed to the BatchGenerator. `probe_interval`: after a failed step, how long the engine waits idle before
        it tries a one-token generation to find out whether it has recovered. `adapters`: LoRA
        adapters served over this model, chosen per request (serve/adapters.py)."""
        if max_batch_size < 1 or max_queue < 0:
            raise GenforgeError("max_batch_size must be >= 1 and max_queue >= 0", param="max_batch_size")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        extra = {} if max_prefill_tokens is None else {"max_prefill_tokens": max_prefill_tokens}
        # the generator prefills long prompts in chunks (max_prefill_tokens per step) and may trim
        # the batch to what `kv_cache_bytes` holds at max_model_len (or refuse: ConfigError)
        self.gen = BatchGenerator(model, tokenizer, max_batch_size=max_batch_size,
                                  max_model_len=max_model_len, fast=fast,
                                  compile=compile, kv_cache_bytes=kv_cache_bytes, prepack=prepack,
                                  freeze=freeze, **extra)
        self.max_model_len = self.gen.max_model_len
        self.max_batch_size = self.gen.max_batch_size  # after the KV budget's trim
        self.adapters = adapters
        if adapters is not None:
            adapters.attach(self.gen.runner, model)
        self.observer = observer or EngineObserver()
        self._waiting: collections.deque[RequestStream] = collections.deque()
        self._running: dict[Sequence, RequestStream] = {}
        self._cv = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._drain = True
        self.steps = 0
        self.generated_tokens = 0
        self.probe_interval = probe_interval
        self.fault: str | None = None  # error id of the last failed step, until the engine recovers
        self._fault_at = 0.0
        self._test_delay = _parse_test_delay(os.environ.get(TEST_DELAY_ENV))

    @property
    def fast_path(self) -> bool:
        return self.gen.fast_path

    @property
    def healthy(self) -> bool:
        """The scheduler runs and its last step did not fail (or it recovered since)."""
        return self._thread is not None and self._thread.is_alive() and self.fault is None

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache's token capacity the running rows hold (0..1)."""
        rows = list(self.gen.rows)  # a copy: read from the metrics thread while the scheduler runs
        used = sum(s.length for s in rows)
        return used / float(self.max_batch_size * self.max_model_len)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            if self._test_delay is not None:  # relative times count from now
                delay, start, end = self._test_delay
                now = time.time()
                self._test_delay = (delay, start if start > 1e9 else now + start, end if end > 1e9 else now + end)
                log.warning("%s: every engine iteration sleeps %g s between %s and %s (a test setting)",
                            TEST_DELAY_ENV, delay, time.strftime("%H:%M:%S", time.localtime(self._test_delay[1])),
                            "the end" if math.isinf(end) else
                            time.strftime("%H:%M:%S", time.localtime(self._test_delay[2])))
            self._thread = threading.Thread(target=self._loop, name="genforge-engine", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; when `drain`, finish what is queued and running (for at most `timeout`
        seconds, then abort the rest), else abort it at once."""
        with self._cv:
            self._accepting = False
            self._stop, self._drain = True, drain
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # the drain ran out of time: abort what is left
                with self._cv:
                    self._drain = False
                    self._cv.notify()
                self._thread.join()
            self._thread = None
        else:  # never started: nothing can run the queue
            self._abort_all("the engine shut down; retry on another replica")

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(drain=False)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; OverloadedError when the queue is full, GenforgeError for bad input."""
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(self, items: list[tuple[list[int], SamplingParams]], adapter: str | None = None
                    ) -> list[RequestStream]:
        """Queue several sequences (one request's prompts x choices) together: all or none.
        `adapter`: the LoRA adapter they run with (a name the registry holds; None: the base).

        Everything is validated before anything is queued, and the queue's room is checked for all
        of them at once, so a request never leaves half its choices behind in the queue.
        """
        if adapter is not None and (self.adapters is None or adapter not in self.adapters.infos):
            raise GenforgeError(f"model: no adapter named {adapter!r} is served", param="model")
        streams = [RequestStream(self, self.gen.new_sequence(list(ids), params)) for ids, params in items]
        for stream in streams:
            stream._seq.adapter = adapter
        with self._cv:
            # checked under the lock the scheduler takes to exit: a stream queued here is either
            # run or aborted by the scheduler, never left without a final event
            if not self._accepting:
                raise OverloadedError("the engine is shutting down; retry on another replica")
            if len(streams) > self.max_queue:
                raise GenforgeError(f"n: this request needs {len(streams)} sequences (prompts x n) but the "
                                    f"queue holds at most {self.max_queue}; send fewer prompts or a smaller n",
                                    param="n")
            if len(self._waiting) + len(streams) > self.max_queue:
                raise OverloadedError(f"the server is busy ({len(self._waiting)} requests queued); retry later")
            self._waiting.extend(streams)
            self._cv.notify()
        return streams

    def _cancel(self, stream: RequestStream) -> None:
        with self._cv:
            try:
                self._waiting.remove(stream)  # still queued: it leaves now, not at the next step
                queued = True
            except ValueError:
                queued = False
                stream.cancelled = True
            self._cv.notify()
        if queued:
            stream._push(stream._seq.abort())
            self._observe_finish(stream)
            self._notify([stream])

    # -- the scheduler ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                self._run()
        except BaseException:  # the scheduler itself broke: nothing may wait on it any more
            log.exception("engine scheduler stopped")
            raise
        finally:
            with self._cv:
                self._accepting = False
            self._abort_all("the engine stopped; retry on another replica")

    def _idle(self) -> bool:
        return not self._waiting and not self._running and not self._stop and not self._has_cancel()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._idle():
                    if self.fault is None:
                        self._cv.wait()
                        continue
                    left = self._fault_at + self.probe_interval - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stop and (not self._drain or (not self._waiting and not self._running)):
                    break
            if self.fault is not None and not self._running and not self._waiting:
                self._probe()
                continue
            try:
                self._iteration()
            except Exception:  # a bug or out of memory: fail the batch, keep serving
                error_id = f"err-{uuid.uuid4().hex[:12]}"
                log.exception("engine step failed (error id %s)", error_id)
                self.fault, self._fault_at = error_id, time.monotonic()
                self._abort_running(f"the generation engine failed while running this request (error id "
                                    f"{error_id}); retry, and report the id if it keeps happening")

    def _probe(self) -> None:
        """After a failure, with nothing to do: a one-token generation tells whether we recovered."""
        self._fault_at = time.monotonic()
        try:
            seq = self.gen.new_sequence([0], SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True))
            self.gen.add([seq])
            if not seq.finished:  # the round's prefill budget was spent: the step prefills it
                self.gen.step()
            if not seq.finished:
                self.gen.remove(seq)
                raise RuntimeError("the probe sequence did not finish in one step")
        except Exception:
            log.exception("engine probe after fault %s failed", self.fault)
            self.gen.reset()
            return
        log.info("engine recovered after fault %s", self.fault)
        self.fault = None

    def _has_cancel(self) -> bool:
        return any(s.cancelled for s in self._running.values()) or any(s.cancelled for s in self._waiting)

    def _iteration(self) -> None:
        touched: list[RequestStream] = []
        try:
            self._iteration_body(touched)
        finally:
            # also when the step failed: requests that finished earlier in this iteration have
            # their final event queued, and their consumers must be woken to read it
            self._notify(touched)

    def _iteration_body(self, touched: list[RequestStream]) -> None:
        t0 = time.perf_counter()
        for seq, stream in list(self._running.items()):
            if stream.cancelled:
                self.gen.remove(seq)
                self._running.pop(seq)
                self._finish(stream, seq.abort(), touched)
        admit: list[RequestStream] = []
        with self._cv:
            # every free slot takes a request: the generator prefills in chunks within its token
            # budget per step, so a burst of long prompts does not stall the running rows
            blocked: list[RequestStream] = []
            while self._waiting and len(admit) < self.gen.free_slots:
                nxt = self._waiting.popleft()
                if nxt.cancelled:
                    self._finish(nxt, nxt._seq.abort(), touched)
                    continue
                if nxt._seq.adapter is not None:
                    # may read the adapter's weights from disk (and evict an idle one)
                    slot = self.adapters.acquire(nxt._seq.adapter)
                    if slot is None:  # every LoRA slot is held by running rows: wait, let others pass
                        blocked.append(nxt)
                        continue
                    nxt._seq.lora_slot = slot
                admit.append(nxt)
            self._waiting.extendleft(reversed(blocked))
        if admit:
            now = time.perf_counter()
            for stream in admit:
                stream.admitted_at = now
                self._running[stream._seq] = stream
                self.observer.on_admit(now - stream.submitted)
            self._deliver(self.gen.add([s._seq for s in admit]), touched)
            self.fault = None  # a model call succeeded: whatever failed before has passed
        if self.gen.rows:
            self._deliver(self.gen.step(), touched)
            self.steps += 1
            self.fault = None
        if self._test_delay is not None and self._test_delay[1] <= time.time() < self._test_delay[2]:
            time.sleep(self._test_delay[0])
        self.observer.on_step(batch_size=len(self.gen.rows), num_waiting=len(self._waiting),
                              seconds=time.perf_counter() - t0)

    def _deliver(self, events: list[tuple[Sequence, TokenEvent]], touched: list[RequestStream]) -> None:
        obs = self.observer
        for seq, ev in events:
            stream = self._running[seq]
            prev = stream.last_token_at
            stream._push(ev)
            self.generated_tokens += 1
            if prev is None:
                obs.on_first_token(stream.first_token_at - stream.submitted)
            else:
                obs.on_token(stream.last_token_at - prev)
            touched.append(stream)
            if ev.finish_reason is not None:
                self._running.pop(seq, None)
                self._observe_finish(stream)

    def _finish(self, stream: RequestStream, ev: TokenEvent, touched: list[RequestStream]) -> None:
        stream._push(ev)
        touched.append(stream)
        self._observe_finish(stream)

    def _observe_finish(self, stream: RequestStream) -> None:
        seq = stream._seq
        if self.adapters is not None:
            if seq.lora_slot:
                self.adapters.release(seq.lora_slot)
                seq.lora_slot = 0
            self.adapters.finished(seq.adapter, stream.completion_tokens)
        self.observer.on_finish(e2e_seconds=(stream.finished_at or time.perf_counter()) - stream.submitted,
                                prompt_tokens=stream.prompt_tokens, completion_tokens=stream.completion_tokens,
                                finish_reason=stream.finish_reason or "abort")

    @staticmethod
    def _notify(touched: list[RequestStream]) -> None:
        """Wake asyncio consumers: one call_soon_threadsafe per event loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        for stream in touched:
            if stream._loop is not None:
                by_loop.setdefault(stream._loop, []).append(stream._aevent)
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed; its consumers are gone
                pass

    def _abort_running(self, error: str, status: int = 500) -> None:
        touched: list[RequestStream] = []
        try:
            self.gen.reset()
        except Exception:  # the cache may be as broken as the step; the requests still get their end
            log.exception("engine reset failed")
        for seq, stream in list(self._running.items()):
            seq.finish_reason = "abort"
            stream.error_status = status
            stream._push(TokenEvent(None, "", finish_reason="abort", error=error))
            touched.append(stream)
            self._observe_finish(stream)
        self._running.clear()
        self._notify(touched)

    def _abort_all(self, error: str) -> None:
        """Shutdown: everything left ends now, with a 503-type error (retry elsewhere)."""
        self._abort_running(error, status=503)
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for stream in waiting:
            stream._seq.finish_reason = "abort"
            stream.error_status = 503
            stream._push(TokenEvent(None, "", finish_reason="abort", error=error))
            self._observe_finish(stream)
        self._notify(waiting)
