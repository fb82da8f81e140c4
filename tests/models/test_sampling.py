"""The batched sampler: each row's draws depend only on its own seed, and the distributions it
samples are the ones asked for (temperature, top-k, top-p renormalised, tiny top_p, greedy)."""

from __future__ import annotations

import pytest
import torch

from genforge.common.errors import GenforgeError
from genforge.models.sampling import (
    MAX_LOGPROBS,
    SAMPLING_RANGES,
    BatchSampler,
    RowSampler,
    SamplingParams,
    check_prompt_length,
    uniform,
)

VOCAB = 12


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, VOCAB, generator=g) * 2


def _row(**kw) -> RowSampler:
    return RowSampler(SamplingParams(**kw), [1, 2, 3], VOCAB, eos_ids={0})


def test_rows_do_not_depend_on_their_companions():
    kinds = [dict(temperature=0.9, seed=11), dict(temperature=1.3, top_k=4, seed=12),
             dict(temperature=0.7, top_p=0.6, seed=13, logprobs=2), dict(temperature=0),
             dict(temperature=1.0, seed=14, presence_penalty=1.0, min_tokens=2)]
    logits = _logits(len(kinds))

    def run(indices: list[int]) -> dict[int, list[int]]:
        rows = {i: _row(**kinds[i]) for i in indices}
        out: dict[int, list[int]] = {i: [] for i in indices}
        sampler = BatchSampler()
        for _ in range(25):
            toks, _, _ = sampler(logits[indices], [rows[i] for i in indices])
            for i, t in zip(indices, toks):
                rows[i].observe(t)
                out[i].append(t)
        return out

    together = run(list(range(len(kinds))))
    for i in range(len(kinds)):
        assert run([i])[i] == together[i], kinds[i]
    assert run([4, 1])[1] == together[1]  # another order, another company


def _frequencies(logits_row: torch.Tensor, n_rows: int = 200, steps: int = 30, **kw) -> torch.Tensor:
    rows = [_row(seed=s, **kw) for s in range(n_rows)]
    logits = logits_row.expand(n_rows, VOCAB).contiguous()
    sampler = BatchSampler()
    counts = torch.zeros(VOCAB)
    for _ in range(steps):
        toks, _, _ = sampler(logits, rows)
        counts += torch.bincount(torch.tensor(toks), minlength=VOCAB)
    return counts / counts.sum()


def test_sampled_distributions_are_the_asked_ones():
    x = _logits(1, seed=3)[0]
    # 6000 draws: a frequency's standard error is at most 0.0065
    assert (_frequencies(x, temperature=0.8) - torch.softmax(x / 0.8, -1)).abs().max() < 0.03
    p = torch.softmax(x, -1)
    top4 = p.topk(4).indices
    want = torch.zeros(VOCAB)
    want[top4] = p[top4] / p[top4].sum()
    assert (_frequencies(x, temperature=1.0, top_k=4) - want).abs().max() < 0.03
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]
    nucleus = order[before < 0.7]
    want = torch.zeros(VOCAB)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    freq = _frequencies(x, temperature=1.0, top_p=0.7)
    assert set(torch.nonzero(freq).flatten().tolist()) == set(nucleus.tolist())
    assert (freq - want).abs().max() < 0.03


def test_tiny_top_p_and_top_k_1_are_greedy():
    logits = _logits(64, seed=5)
    argmax = logits.argmax(-1).tolist()
    # a tiny top_p falls back to sorting; 5e-324 (a valid API value) is 0 in float32 and must not
    # empty the nucleus (it once picked token id == vocabulary size: an engine crash)
    for kw in (dict(top_p=1e-6), dict(top_p=5e-324), dict(top_k=1)):
        rows = [_row(seed=s, temperature=1.5, **kw) for s in range(64)]
        assert BatchSampler()(logits, rows)[0] == argmax


def test_never_samples_a_masked_token():
    logits = torch.full((8, VOCAB), float("-inf"))
    logits[:, 3] = 0.0  # one allowed token, at the start of the CDF's flat tail
    rows = [_row(seed=s, temperature=1.0) for s in range(8)]
    for _ in range(20):
        assert BatchSampler()(logits, rows)[0] == [3] * 8


def test_logprobs_of_mixed_rows():
    logits = _logits(3)
    rows = [_row(temperature=0, logprobs=3), _row(temperature=0), _row(temperature=0.5, seed=1, logprobs=0)]
    toks, lps, tops = BatchSampler()(logits, rows)
    ref = torch.log_softmax(logits, -1)
    assert lps[0] == pytest.approx(float(ref[0, toks[0]])) and lps[1] is None
    assert lps[2] == pytest.approx(float(ref[2, toks[2]]))
    assert [t for t, _ in tops[0]] == ref[0].topk(3).indices.tolist() and tops[1] is None and tops[2] == []


def test_uniform_is_a_pure_function_of_seed_and_counter():
    assert uniform(5, 3) == uniform(5, 3) and uniform(5, 3) != uniform(5, 4) != uniform(6, 3)
    us = [uniform(-(2 ** 63), d) for d in range(2000)] + [uniform(2 ** 64 - 1, d) for d in range(2000)]
    assert all(0 < u < 1 for u in us) and abs(sum(us) / len(us) - 0.5) < 0.02


def test_ranges_are_the_validation():
    assert SAMPLING_RANGES["logprobs"].le == MAX_LOGPROBS
    assert SAMPLING_RANGES["top_p"].field_kwargs() == {"gt": 0.0, "le": 1.0}
    SamplingParams(seed=2 ** 64 - 1).validate()
    with pytest.raises(GenforgeError) as e:
        SamplingParams(seed=2 ** 64).validate()
    assert e.value.param == "seed"


def test_check_prompt_length():
    assert check_prompt_length(10, None, 64) == 54
    assert check_prompt_length(10, 20, 64) == 20
    with pytest.raises(GenforgeError) as e:
        check_prompt_length(10, 60, 64, tokens_field="max_completion_tokens")
    assert e.value.param == "max_completion_tokens" and e.value.code == "context_length_exceeded"
    with pytest.raises(GenforgeError) as e:
        check_prompt_length(64, None, 64, prompt_field="messages")
    assert e.value.param == "messages"
    with pytest.raises(GenforgeError, match="empty"):
        check_prompt_length(0, None, 64)


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_extreme_repetition_penalties_still_pick_a_token_in_the_vocabulary(penalty, temperature):
    # prompt tokens 1, 2, 3 are penalised: tiny penalties push their logits to +inf
    rows = [_row(repetition_penalty=penalty, temperature=temperature, seed=i) for i in range(3)]
    tokens, _, _ = BatchSampler()(_logits(3), rows)
    assert all(0 <= t < VOCAB for t in tokens), tokens
