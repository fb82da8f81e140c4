"""The continuous-batching engine: concurrency, overload, cancellation, async consumers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from genforge.common.errors import GenforgeError, OverloadedError
from genforge.models.generation import generate
from genforge.serve.engine import Engine, EngineObserver, SamplingParams

from .conftest import CORPUS


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


class Recorder(EngineObserver):
    def __init__(self):
        self.ttft, self.itl, self.finished = [], [], []

    def on_first_token(self, seconds):
        self.ttft.append(seconds)

    def on_token(self, seconds):
        self.itl.append(seconds)

    def on_finish(self, **kw):
        self.finished.append(kw)


@pytest.mark.parametrize("fast", [True, False])
def test_concurrent_submits_equal_sequential(model, tok, fast):
    prompts = [tok.encode(t) for t in CORPUS]
    expected = [[e.token_id for e in generate(model, tok, p, greedy(8 + i))] for i, p in enumerate(prompts)]
    obs = Recorder()
    with Engine(model, tok, max_batch_size=4, observer=obs, fast=fast) as engine:
        assert engine.fast_path is fast
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            results[i] = [e.token_id for e in engine.submit(prompts[i], greedy(8 + i))]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert [results[i] for i in range(len(prompts))] == expected
    assert len(obs.ttft) == len(prompts) and len(obs.finished) == len(prompts)
    assert sum(f["completion_tokens"] for f in obs.finished) == sum(len(e) for e in expected)
    assert len(obs.itl) == sum(len(e) - 1 for e in expected)


def test_seed_gives_same_text_with_any_batch_companions(model, tok):
    p = tok.encode(CORPUS[0])
    params = SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.9, seed=11, ignore_eos=True)
    with Engine(model, tok, max_batch_size=8) as engine:
        alone = [e.token_id for e in engine.submit(p, params)]
        others = [engine.submit(tok.encode(t), SamplingParams(max_new_tokens=20, temperature=0.7, seed=i))
                  for i, t in enumerate(CORPUS)]
        together = [e.token_id for e in engine.submit(p, params)]
        for s in others:
            s.text()
    assert alone == together


def test_queue_full_raises_overloaded(model, tok):
    engine = Engine(model, tok, max_batch_size=1, max_queue=2)  # not started: nothing drains the queue
    streams = [engine.submit([1, 2, 3], greedy(4)) for _ in range(2)]
    assert engine.num_waiting == 2
    with pytest.raises(OverloadedError) as e:
        engine.submit([1, 2, 3], greedy(4))
    assert e.value.status == 503
    engine.shutdown(drain=False)
    assert all(s.text() == "" and s.finish_reason == "abort" for s in streams)
    with pytest.raises(OverloadedError):
        engine.submit([1, 2, 3], greedy(4))


def test_submit_validates(model, tok):
    engine = Engine(model, tok, max_batch_size=1)
    with pytest.raises(GenforgeError) as e:
        engine.submit(list(range(1, 129)), greedy(4))
    assert e.value.param == "prompt"
    with pytest.raises(GenforgeError) as e:
        engine.submit([1, 2], SamplingParams(top_p=2.0))
    assert e.value.param == "top_p"


def test_cancel_frees_slot(model, tok):
    with Engine(model, tok, max_batch_size=1) as engine:
        long = engine.submit([1, 2, 3], greedy(100))
        it = iter(long)
        first = [next(it).token_id for _ in range(2)]
        assert all(t is not None for t in first)
        long.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "abort" and long.completion_tokens < 100
        # the only slot is free again: a new request runs to completion
        short = engine.submit([4, 5], greedy(5))
        events = list(short)
        assert len(events) == 5 and events[-1].finish_reason == "length"
        deadline = time.time() + 5
        while engine.num_running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0 and not engine.gen.rows


def test_async_consumers_and_early_break(model, tok):
    prompts = [tok.encode(t) for t in CORPUS[:4]]
    expected = [[e.token_id for e in generate(model, tok, p, greedy(10))] for p in prompts]

    async def main(engine: Engine) -> list[list[int]]:
        async def one(p):
            return [ev.token_id async for ev in engine.submit(p, greedy(10))]

        async def quitter():  # stops reading after 2 tokens: its request is cancelled
            stream = engine.submit(prompts[0], greedy(100))
            n = 0
            async for _ in stream:
                n += 1
                if n == 2:
                    break
            return stream

        results = await asyncio.gather(*(one(p) for p in prompts), quitter())
        return results

    with Engine(model, tok, max_batch_size=8) as engine:
        *got, quit_stream = asyncio.run(main(engine))
        deadline = time.time() + 5
        while quit_stream.finish_reason is None and time.time() < deadline:
            time.sleep(0.01)
    assert got == expected
    assert quit_stream.finish_reason == "abort" and quit_stream.completion_tokens < 100


def test_shutdown_drains(model, tok):
    engine = Engine(model, tok, max_batch_size=2)
    engine.start()
    streams = [engine.submit([1 + i, 2], greedy(6)) for i in range(4)]
    engine.shutdown(drain=True)
    assert all(s.finish_reason == "length" and s.completion_tokens == 6 for s in streams)
