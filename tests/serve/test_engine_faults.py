"""The engine under faults: cancelled requests leave the queue at once, all-or-none submission,
failed steps wake everyone they touched, health after a fault, bounded shutdown, no hang at shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from genforge.common.errors import GenforgeError, OverloadedError
from genforge.serve.engine import Engine, SamplingParams


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_cancelled_request_leaves_the_queue_at_once(model, tok):
    """Nothing runs the queue (engine not started): a cancel must still free the place now."""
    engine = Engine(model, tok, max_batch_size=1, max_queue=2)
    a, b = engine.submit([1, 2], greedy(4)), engine.submit([3, 4], greedy(4))
    a.cancel()
    assert engine.num_waiting == 1
    events = list(a)  # its final event is there without any scheduler step
    assert events[-1].finish_reason == "abort"
    engine.submit([5, 6], greedy(4))  # the freed place is usable: no 503 from a dead entry
    with pytest.raises(OverloadedError):
        engine.submit([5, 6], greedy(4))
    engine.shutdown(drain=False)
    assert b.finish_reason == "abort"


def test_submit_many_is_all_or_none(model, tok):
    engine = Engine(model, tok, max_batch_size=1, max_queue=3)
    engine.submit([1, 2], greedy(4))
    engine.submit([1, 2], greedy(4))
    with pytest.raises(OverloadedError):  # room for one of the two: neither is queued
        engine.submit_many([([1, 2], greedy(4)), ([3], greedy(4))])
    assert engine.num_waiting == 2
    with pytest.raises(GenforgeError) as e:  # can never fit: the client's fault, a 400
        engine.submit_many([([1, 2], greedy(4))] * 4)
    assert e.value.status == 400 and e.value.param == "n"
    with pytest.raises(GenforgeError):  # a bad later item: nothing queued either
        engine.submit_many([([1, 2], greedy(4)), ([1, 2], SamplingParams(top_p=5.0))])
    assert engine.num_waiting == 2
    engine.shutdown(drain=False)


def test_failed_step_wakes_every_request_it_touched(model, tok):
    """A request that finished at admission (max_tokens=1) in the same iteration as a failing
    decode step still gets its final event delivered to its asyncio consumer."""
    engine = Engine(model, tok, max_batch_size=4, probe_interval=60)

    def boom():
        raise RuntimeError("secret internal detail /home/x")

    engine.gen.step = boom

    async def main():
        one = engine.submit([1, 2, 3], greedy(1))
        many = engine.submit([4, 5], greedy(20))
        engine.start()  # both are admitted in the same iteration; the decode step then fails

        async def read(stream):
            return [ev async for ev in stream]

        return await asyncio.wait_for(asyncio.gather(read(one), read(many)), timeout=10)

    try:
        first, second = asyncio.run(main())
    finally:
        engine.shutdown(drain=False)
    assert first[-1].finish_reason == "length" and len(first) == 1
    assert second[-1].finish_reason == "abort"
    assert "secret" not in second[-1].error and "RuntimeError" not in second[-1].error
    assert "error id err-" in second[-1].error


def test_fault_makes_engine_unhealthy_until_it_recovers(model, tok):
    engine = Engine(model, tok, max_batch_size=2, probe_interval=0.3)
    real_step, calls = engine.gen.step, []

    def once():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("boom")
        return real_step()

    engine.gen.step = once
    with engine:
        assert engine.healthy
        assert list(engine.submit([1, 2], greedy(5)))[-1].finish_reason == "abort"
        assert not engine.healthy and engine.fault
        deadline = time.monotonic() + 10  # idle: the probe finds the engine working again
        while not engine.healthy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.healthy
        events = list(engine.submit([1, 2], greedy(5)))
        assert events[-1].finish_reason == "length" and len(events) == 5


def test_submit_racing_shutdown_always_gets_a_final_event(model, tok):
    engine = Engine(model, tok, max_batch_size=2, max_queue=1000)
    engine.start()
    streams, stop = [], threading.Event()

    def submitter():
        while not stop.is_set():
            try:
                streams.append(engine.submit([1, 2], greedy(3)))
            except OverloadedError:
                return

    threads = [threading.Thread(target=submitter) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    engine.shutdown(drain=False)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    deadline = time.monotonic() + 10
    for s in streams:
        while not s.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.done, "a stream never got its final event"
    with pytest.raises(OverloadedError):
        engine.submit([1, 2], greedy(3))


def test_shutdown_drain_is_bounded(model, tok):
    engine = Engine(model, tok, max_batch_size=1)
    engine.start()
    streams = [engine.submit([1, 2], greedy(120)) for _ in range(30)]  # 3600 steps in a row
    t0 = time.monotonic()
    engine.shutdown(drain=True, timeout=0.1)
    assert time.monotonic() - t0 < 5
    assert all(s.done for s in streams)
    assert streams[-1].finish_reason == "abort" and streams[-1].error_status == 503


def test_kv_cache_budget_trims_the_batch_or_refuses(model, tok):
    from genforge.common.errors import ConfigError

    one_row = Engine(model, tok, max_batch_size=1).max_model_len  # positions per full-length row
    with pytest.warns(UserWarning, match="trimmed"):
        trimmed = Engine(model, tok, max_batch_size=32, kv_cache_bytes=one_row * 2 * 2 * 2 * 16 * 4 * 3)
    assert 1 <= trimmed.max_batch_size < 32
    with pytest.raises(ConfigError):
        Engine(model, tok, max_batch_size=4, kv_cache_bytes=1000)
