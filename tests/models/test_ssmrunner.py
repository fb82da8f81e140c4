"""State-space LMs: StateSpaceRunner batches Mamba2's decode step over per-row states; HFRunner hands
Mamba/Mamba2 their cache under the right name. Greedy tokens equal HF `generate`."""

from __future__ import annotations

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from genforge.models.fastdecode import HFRunner, StateSpaceRunner
from genforge.models.generation import BatchGenerator
from genforge.models.sampling import SamplingParams
from tests.conftest import tiny_random_llama
from tests.models.test_fastdecode_moe import batched_greedy, hf_greedy

PROMPTS = [list(range(5, 17)), list(range(30, 33)), list(range(100, 140)), [7]]  # 12, 3, 40, 1 tokens


def mamba2() -> Mamba2ForCausalLM:
    return Mamba2ForCausalLM(Mamba2Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=16, head_dim=32, num_heads=4,
        n_groups=1, chunk_size=16, max_position_embeddings=128, eos_token_id=0, pad_token_id=0)).eval()


def test_batched_mamba2_equals_hf_generate_with_chunked_prefill():
    torch.manual_seed(0)
    model = mamba2()
    ref = hf_greedy(model, PROMPTS, 8)
    _, tok = tiny_random_llama()
    # 16 prompt tokens per round: the 40-token prompt is prefilled in three chunks, continuing its state
    gen = BatchGenerator(model, tok, max_batch_size=4, max_prefill_tokens=16)
    assert isinstance(gen.runner, StateSpaceRunner) and gen.batched and not gen.fast_path
    ours, widest = batched_greedy(gen, PROMPTS, 8)
    assert ours == ref
    assert widest == len(PROMPTS)


def test_rows_leaving_and_joining_keep_their_states():
    """Rows finish at different steps (their slots are compacted: move/swap) and a new row takes a
    freed slot; each row's tokens still equal its own greedy generate."""
    torch.manual_seed(1)
    model = mamba2()
    _, tok = tiny_random_llama()
    lengths = [3, 9, 5, 7]
    ref = [hf_greedy(model, [p], n)[0] for p, n in zip(PROMPTS, lengths)]
    late = hf_greedy(model, [[42, 43, 44, 45]], 6)[0]
    gen = BatchGenerator(model, tok, max_batch_size=4, max_prefill_tokens=16)
    seqs = [gen.new_sequence(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
            for p, n in zip(PROMPTS, lengths)]
    out: dict[int, list[int]] = {id(s): [] for s in seqs}
    greedy6 = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    pending = [gen.new_sequence([42, 43, 44, 45], greedy6)]
    out[id(pending[0])] = []
    events = gen.add(seqs)
    while gen.rows or pending:
        for s, ev in events:
            out[id(s)].append(ev.token_id)
        if pending and gen.free_slots:
            events = gen.add([pending.pop()]) + gen.step()
        else:
            events = gen.step() if gen.rows else []
    for s, ev in events:
        out[id(s)].append(ev.token_id)
    assert [out[id(s)] for s in seqs] == ref
    assert list(out.values())[-1] == late


def test_decode_is_one_forward_for_all_rows():
    model = mamba2()
    runner = StateSpaceRunner(model, max_len=128, slots=1)  # grows on demand
    runner.prefill(0, [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    batches: list[int] = []
    handle = model.register_forward_hook(lambda mod, args, kw, out: batches.append(kw["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        logits = runner.decode([1, 2, 3], [3, 2, 4])
    finally:
        handle.remove()
    assert batches == [3] and logits.shape == (3, 300)
    assert runner.slots >= 3


def test_hf_fallback_gives_state_space_models_their_cache():
    """HFRunner (one row at a time) on Mamba2 and Mamba: the state is carried from step to step,
    and Mamba's chunked prefill continues from the cached state."""
    torch.manual_seed(2)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, state_size=8,
                                         eos_token_id=0, pad_token_id=0)).eval()
    for model in (mamba2(), mamba):
        ref = hf_greedy(model, PROMPTS[:2], 6)
        _, tok = tiny_random_llama()
        gen = BatchGenerator(model, tok, max_batch_size=2, fast=False)
        assert isinstance(gen.runner, HFRunner) and not gen.batched
        assert batched_greedy(gen, PROMPTS[:2], 6)[0] == ref
        runner = HFRunner(model, max_len=128)
        whole = runner.extend([0], [PROMPTS[2]], [0])
        runner.extend([1], [PROMPTS[2][:10]], [0])
        chunked = runner.extend([1], [PROMPTS[2][10:]], [10])
        assert (whole - chunked).abs().max() < 1e-4
