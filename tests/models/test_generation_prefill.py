"""Chunked prefill and length buckets: a long prompt enters the cache a chunk per round while the
running rows keep getting a token every step, and its logits equal an unchunked prefill's."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from genforge.models.fastdecode import LlamaRunner, _buckets
from genforge.models.generation import BatchGenerator
from genforge.models.sampling import SamplingParams

from .test_generation import CORPUS, hf_reference, llama_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(4)
    return LlamaForCausalLM(llama_config(len(tok), max_position_embeddings=256)).eval()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def test_chunks_and_buckets_equal_whole_prefill(model):
    long, mid, short = list(range(3, 123)), list(range(50, 90)), list(range(7, 12))
    ref, _ = hf_reference(model, [long, mid, short], steps=0)
    runner = LlamaRunner(model, max_len=256, slots=2)
    # long in chunks of 50 into slot 3; mid and short together (buckets) into slots 0 and 5
    runner.extend([3], [long[:50]], [0])
    runner.extend([3, 0], [long[50:100], mid[:30]], [50, 0])
    out = runner.extend([5, 3, 0], [short, long[100:], mid[30:]], [0, 100, 30])
    assert (out - ref[0][[2, 0, 1]]).abs().max() < 1e-4
    # the caches are right too: one decode step of all three from their slots
    runner.move(5, 1, len(short))
    runner.move(3, 2, len(long))
    step = runner.decode([1, 1, 1], [len(mid), len(short), len(long)])
    whole = LlamaRunner(model, max_len=256)
    whole.prefill(0, [mid, short, long])
    assert (step - whole.decode([1, 1, 1], [len(mid), len(short), len(long)])).abs().max() < 1e-4


def test_buckets_do_not_pad_short_rows_to_a_long_one():
    groups = _buckets([500, 10, 12, 480, 11])
    assert sorted(map(sorted, groups)) == [[0, 3], [1, 2, 4]]
    assert _buckets([5]) == [[0]]


def test_running_rows_get_a_token_every_step_while_a_long_prompt_prefills(model, tok):
    long = [5 + (i * 7) % 200 for i in range(150)]
    alone = [e.token_id for e in BatchGenerator(model, tok, max_batch_size=1).generate(long, _greedy(5))]
    gen = BatchGenerator(model, tok, max_batch_size=4, max_prefill_tokens=32)
    running = [gen.new_sequence(tok.encode(t), _greedy(60)) for t in CORPUS[:2]]
    gen.add(running)
    while gen.num_prefilling:  # 43 prompt tokens: the second row's prompt takes two rounds
        gen.step()
    late = gen.new_sequence(long, _greedy(5))
    events = gen.add([late])
    cached = [late.prefilled]
    while not any(s is late for s, _ in events):
        assert gen.num_prefilling == 1 and late.prefilled < len(long)
        events = gen.step()
        cached.append(late.prefilled)
        for s in running:  # every running row: exactly one token this step
            assert sum(1 for r, _ in events if r is s) == 1
    chunks = [b - a for a, b in zip([0] + cached, cached)]
    assert max(chunks) == 32 and sum(chunks) == len(long)  # at most the budget per add+step round
    assert len(chunks) <= -(-len(long) // 32) + 1
    out = [ev.token_id for s, ev in events if s is late]
    while not late.finished:
        out += [ev.token_id for s, ev in gen.step() if s is late]
    assert out == alone


@pytest.mark.parametrize("seed, fast", [(0, True), (1, True), (2, True), (3, False)])
def test_random_churn_equals_one_at_a_time(model, tok, seed, fast):
    """Rows join, prefill in chunks, decode, are cancelled mid-prefill or mid-decode, in any order:
    every finished row's tokens equal its generation alone (this found a stale-length swap)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randrange(2, 70))] for _ in range(14)]
    lengths = [rng.randrange(2, 9) for _ in prompts]
    single = BatchGenerator(model, tok, max_batch_size=1)
    alone = [[e.token_id for e in single.generate(p, _greedy(n))] for p, n in zip(prompts, lengths)]
    gen = BatchGenerator(model, tok, max_batch_size=4, max_prefill_tokens=24, fast=fast)
    queue = [gen.new_sequence(p, _greedy(n)) for p, n in zip(prompts, lengths)]
    index = {id(s): i for i, s in enumerate(queue)}
    out: dict[int, list[int]] = {}
    cancelled: set[int] = set()
    for _ in range(400):
        if queue and gen.free_slots and rng.random() < 0.6:
            events = gen.add([queue.pop(0) for _ in range(min(len(queue), rng.randrange(1, gen.free_slots + 1)))])
        else:
            events = gen.step()
        for s, ev in events:
            out.setdefault(index[id(s)], []).append(ev.token_id)
        if gen.rows and rng.random() < 0.1:
            victim = rng.choice(gen.rows)
            cancelled.add(index[id(victim)])
            gen.remove(victim)
        if not queue and not gen.rows:
            break
    assert not gen.rows and not queue
    done = [i for i in range(len(prompts)) if i not in cancelled]
    assert len(done) >= 8
    for i in done:
        assert out[i] == alone[i], i


@pytest.mark.slow
def test_compiled_batch_of_one_leaves_a_prefilling_row_alone(model, tok):
    """The compiled step runs a batch of one as two rows; the throwaway row must write into a free
    slot, not into the cache of the row being prefilled in slot 1."""
    long = [5 + (i * 11) % 250 for i in range(120)]
    short = tok.encode(CORPUS[0])
    ref = LlamaRunner(model, max_len=256)
    ref.prefill(0, [long])
    single = BatchGenerator(model, tok, max_batch_size=1)
    alone = [[e.token_id for e in single.generate(p, _greedy(6))] for p in (short, long)]
    gen = BatchGenerator(model, tok, max_batch_size=3, max_prefill_tokens=16, compile=True)
    assert gen.runner.compiled
    a, b = gen.new_sequence(short, _greedy(6)), gen.new_sequence(long, _greedy(6))
    out: dict[int, list[int]] = {0: [], 1: []}
    events = gen.add([a])
    events += gen.add([b])  # b is prefilled 16 tokens a round in slot 1 while a decodes alone
    while gen.rows:
        for s, ev in events:
            out[0 if s is a else 1].append(ev.token_id)
        if b in gen.rows and 0 < b.prefilled < len(long):  # b's cache so far is exactly its prefill's
            slot, n = gen.rows.index(b), b.prefilled
            for mine, want in zip(gen.runner.cache.layers, ref.cache.layers):
                assert (mine[slot, :, :n] - want[0, :, :n]).abs().max() < 1e-4
        events = gen.step()
    for s, ev in events:
        out[0 if s is a else 1].append(ev.token_id)
    assert out[0] == alone[0] and out[1] == alone[1]
