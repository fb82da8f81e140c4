"""The keyed green-list watermark: the hash, the sampler's bias (per-row keys in one batch), detection."""

from __future__ import annotations

import pytest
import torch

from genforge.common.errors import ConfigError, GenforgeError
from genforge.models.generation import BatchGenerator
from genforge.models.sampling import BatchSampler, RowSampler, SamplingParams
from genforge.models.watermark import (
    PERIOD,
    TextWatermark,
    add_green_bias,
    detect_text,
    green_mask,
    key_from,
    resolve_key,
    score_ids,
)
from tests.conftest import tiny_random_llama

M64 = (1 << 64) - 1


def _mix_py(z: int) -> int:  # splitmix64's finalizer, the specification the torch code must match
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def green_py(key: int, prev: int, tok: int, gamma: float) -> bool:
    start = _mix_py(key ^ _mix_py(prev * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15)) % 2**18
    j = (tok + start) % 2**18  # token t after prev is entry t + start of the key's table
    entry = _mix_py(_mix_py(key ^ 0xD6E8FEB86659FD93) ^ _mix_py(j * 0x94D049BB133111EB + 0xBF58476D1CE4E5B9))
    return (entry & 0xFFFFFFFF) < round(gamma * 2**32)


def _mask(wm: TextWatermark, prev: int, vocab: int) -> torch.Tensor:
    return green_mask(torch.tensor([wm.signed_key]), torch.tensor([prev]), vocab, wm.gamma)[0]


def test_vectorised_hash_is_the_integer_specification():
    # keys with the top bit set (negative as int64), large previous tokens: int64 wrapping and masked shifts
    for secret, prev, gamma in [("a", 0, 0.25), ("tenant-b", 151_935, 0.5), (2**64 - 1, 7, 0.1)]:
        wm = TextWatermark(key_from(secret), gamma=gamma)
        assert _mask(wm, prev, 700).tolist() == [green_py(wm.key, prev, t, gamma) for t in range(700)]


def test_decode_step_bias_is_the_pointwise_green_list():
    # mixed keys, green shares and deltas in one batch, a vocabulary past the table's period (windows wrap)
    for vocab in (300, PERIOD + 77):
        marks = [TextWatermark.from_secret("a"), TextWatermark.from_secret("b", gamma=0.5, delta=1.5),
                 TextWatermark.from_secret("a"), TextWatermark.from_secret("a", delta=4.0)]
        prev, rows = [0, 5, vocab - 1, 7], [0, 2, 3, 4]
        logits = torch.zeros(5, vocab)
        add_green_bias(logits, rows, marks, prev)
        assert torch.equal(logits[1], torch.zeros(vocab))  # the unmarked row
        for r, wm, p in zip(rows, marks, prev):
            assert torch.equal(logits[r], _mask(wm, p, vocab) * wm.delta)
        one = torch.zeros(2, vocab)  # every row one key and delta: the single-add path
        add_green_bias(one, [0, 1], [marks[0]] * 2, [3, 9])
        assert torch.equal(one[1], _mask(marks[0], 9, vocab) * marks[0].delta)


def test_green_share_is_gamma_and_depends_on_key_and_previous_token():
    keys = torch.tensor([TextWatermark.from_secret(f"k{i}").signed_key for i in range(64)])
    mask = green_mask(keys, torch.arange(64) * 31, 4096, 0.25)
    assert abs(mask.float().mean().item() - 0.25) < 0.005
    assert mask.float().mean(1).min() > 0.2 and mask.float().mean(1).max() < 0.3  # every row, not just on average
    a, b = TextWatermark.from_secret("a"), TextWatermark.from_secret("b")
    overlap = (_mask(a, 5, 4096) & _mask(b, 5, 4096)).float().mean().item()
    assert abs(overlap - 0.25 * 0.25) < 0.02  # two keys' green lists are independent
    assert not torch.equal(_mask(a, 5, 4096), _mask(a, 6, 4096))


def test_keys_ids_and_resolution(tmp_path):
    assert key_from("secret") == key_from("secret") != key_from("secret2")
    wm = TextWatermark.from_secret("secret")
    assert len(wm.key_id) == 8 and str(wm.key) not in wm.header() and wm.key_id in wm.header()
    f = tmp_path / "key.txt"
    f.write_text("# the key\n\nsecret\n")
    assert resolve_key(None, str(f), environ={}) == resolve_key("secret", environ={}) == wm.key
    assert resolve_key(None, None, environ={"GENFORGE_WATERMARK_KEY": "secret"}) == wm.key
    assert resolve_key(None, None, environ={}) is None
    for kw, what in [({"flag_value": " "}, "--watermark"), ({"flag_value": None, "key_file": str(tmp_path / "no")},
                                                             "--watermark-key-file"),
                     ({"flag_value": None, "environ": {"GENFORGE_WATERMARK_KEY": ""}}, "GENFORGE_WATERMARK_KEY")]:
        with pytest.raises(ConfigError, match=what):
            resolve_key(**{"environ": {}, **kw})
    with pytest.raises(ConfigError, match="--watermark-gamma"):
        TextWatermark(1, gamma=1.0)
    with pytest.raises(ConfigError, match="--watermark-delta"):
        TextWatermark(1, delta=float("nan"))


def _green_walk(wm: TextWatermark, n: int, vocab: int = 300, start: int = 3) -> list[int]:
    """A token sequence whose every token is green after the one before it (each pair new)."""
    ids, seen = [start], set()
    while len(ids) < n:
        greens = _mask(wm, ids[-1], vocab).nonzero()[:, 0].tolist()
        tok = next(t for t in greens if (ids[-1], t) not in seen)
        seen.add((ids[-1], tok))
        ids.append(tok)
    return ids


def test_scoring_counts_each_pair_once_and_refuses_short_text():
    wm = TextWatermark.from_secret("k")
    ids = _green_walk(wm, 65)
    d = score_ids(ids, wm, min_tokens=32)
    assert d.verdict == "watermarked" and d.scored_tokens == 64 and d.green_fraction == 1.0 and d.z_score > 10
    assert d.p_value < 1e-20
    assert score_ids(ids, TextWatermark.from_secret("other"), 32).verdict == "not_watermarked"
    short = score_ids(ids[:20], wm, min_tokens=32)
    assert short.verdict == "too_short" and short.scored_tokens == 19 and "fewer than the 32" in short.summary()
    assert score_ids(ids[:2] * 40, wm, 32).scored_tokens == 2  # a repeated pair counts once: no inflated z
    assert score_ids([], wm, 1).verdict == "too_short"
    with pytest.raises(GenforgeError, match="min_tokens"):
        score_ids(ids, wm, min_tokens=0)


def _logits(n: int, vocab: int = 512) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(1))


def test_batch_rows_get_their_own_keys_and_plain_rows_are_untouched():
    vocab, a, b = 512, TextWatermark.from_secret("a", delta=3.0), TextWatermark.from_secret("b")
    params = [SamplingParams(seed=1), SamplingParams(seed=2, watermark=a), SamplingParams(seed=3, watermark=b),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, watermark=a)]
    rows = [RowSampler(p, [11, 42], vocab, set()) for p in params]
    sampler, logits = BatchSampler(), _logits(5)
    bp = sampler._params(rows, vocab, logits.device)
    biased = logits.clone()
    add_green_bias(biased, bp.marked, bp.marks, [r.prev for r in rows if r.watermark is not None])
    assert torch.equal(biased[0], logits[0]) and torch.equal(biased[3], logits[3])  # bit-identical
    assert torch.equal(biased[1] - logits[1] > 1.0, _mask(a, 42, vocab))  # bonus 3 exactly on a's green list
    assert torch.equal(biased[2] - logits[2] > 1.0, _mask(b, 42, vocab))  # b's own list in the same step
    assert torch.allclose((biased[1] - logits[1]).max(), torch.tensor(3.0))
    # the plain rows pick exactly what a batch without any watermark picks; the greedy marked row takes the bonus
    tokens, _, _ = BatchSampler()(logits.clone(), rows)
    plain_rows = [RowSampler(p, [11, 42], vocab, set()) for p in [params[0], SamplingParams(temperature=0.0)]]
    plain, _, _ = BatchSampler()(logits[[0, 3]].clone(), plain_rows)
    assert [tokens[0], tokens[3]] == plain
    assert tokens[4] == int((logits[4] + 3.0 * _mask(a, 42, vocab)).argmax())
    assert rows[1].prev == tokens[1] or rows[1].generated == 0  # observe() is the engine's; here not yet called
    rows[1].observe(tokens[1])
    assert rows[1].prev == tokens[1]


@pytest.fixture(scope="module")
def random_lm():
    """A random tiny Llama: near-uniform next-token distributions (high entropy), as the watermark likes."""
    return tiny_random_llama(128)


def test_watermarked_generation_is_detected_with_its_key_only(random_lm):
    model, tok = random_lm
    a, b = TextWatermark.from_secret("tenant-a"), TextWatermark.from_secret("tenant-b")
    prompt = tok("the quick")["input_ids"]
    params = [SamplingParams(max_new_tokens=80, temperature=1.0, seed=s, ignore_eos=True, watermark=w)
              for s, w in [(1, a), (2, b), (3, None)]]
    gen = BatchGenerator(model, tok, max_batch_size=3)  # one batch: the engine's decode step, three keys
    seqs = [gen.new_sequence(prompt, p) for p in params]
    gen.add(seqs)
    while gen.rows:
        gen.step()
    ids = [s.tokens for s in seqs]
    assert score_ids(ids[0], a).verdict == "watermarked" and score_ids(ids[1], b).verdict == "watermarked"
    assert score_ids(ids[0], b).verdict == score_ids(ids[2], a).verdict == "not_watermarked"
    assert abs(score_ids(ids[2], a).z_score) < 3.5
    # (from the text alone, re-tokenised: tests/test_cli_detect.py and tests/serve/test_labelling.py; this
    # random model writes bytes that are not UTF-8, which do not survive decoding)


def test_detect_text_rejects_non_text(random_lm):
    with pytest.raises(GenforgeError, match="text"):
        detect_text(None, random_lm[1], TextWatermark(1))
