"""Mixture-of-experts models on the batched fast path: LlamaRunner runs attention itself and each MoE
layer's own sparse block (router + experts) on the whole batch; greedy tokens equal HF `generate`."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from genforge.models.fastdecode import LlamaRunner
from genforge.models.generation import BatchGenerator
from genforge.models.llamacore import fast_path_unsupported
from genforge.models.lm import LMSpec, build_lm_config, create_lm
from genforge.models.sampling import SamplingParams
from tests.conftest import tiny_random_llama

PROMPTS = [list(range(5, 17)), list(range(30, 33)), list(range(100, 125)), [7]]  # 12, 3, 25, 1 tokens
NEW = 8


def mixtral() -> MixtralForCausalLM:
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        eos_token_id=0)).eval()


def qwen2_moe() -> Qwen2MoeForCausalLM:
    # layer 0 a dense MLP, layer 1 sparse with a shared expert: both kinds in one model
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, max_position_embeddings=128,
        eos_token_id=0)).eval()


def hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def batched_greedy(gen: BatchGenerator, prompts: list[list[int]], new: int) -> tuple[list[list[int]], int]:
    """All prompts join one batch at once; tokens per prompt, and the largest decode batch seen."""
    params = SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True)
    seqs = [gen.new_sequence(p, params) for p in prompts]
    out: dict[int, list[int]] = {id(s): [] for s in seqs}
    widest = 0
    events = gen.add(seqs)
    while True:
        for s, ev in events:
            out[id(s)].append(ev.token_id)
        if not gen.rows:
            break
        widest = max(widest, len(gen.rows))
        events = gen.step()
    return [out[id(s)] for s in seqs], widest


@pytest.mark.parametrize("build", [mixtral, qwen2_moe], ids=["mixtral", "qwen2-moe"])
@pytest.mark.parametrize("prepack", [False, True], ids=["eager", "prepacked"])
def test_moe_batched_fast_path_equals_hf_generate(build, prepack):
    torch.manual_seed(3)
    model = build()
    assert fast_path_unsupported(model) is None
    ref = hf_greedy(model, PROMPTS, NEW)  # before prepacking takes the model's attention weights
    _, tok = tiny_random_llama()
    gen = BatchGenerator(model, tok, max_batch_size=4, prepack=prepack)
    assert gen.fast_path and gen.batched and isinstance(gen.runner, LlamaRunner)
    assert sum(b is not None for b in gen.runner.moe) >= 1
    ours, widest = batched_greedy(gen, PROMPTS, NEW)
    assert ours == ref
    assert widest == len(PROMPTS)  # the four rows decoded as one batch


def test_moe_layers_run_the_models_own_block_once_per_step_for_the_whole_batch():
    torch.manual_seed(4)
    model = mixtral()
    runner = LlamaRunner(model, max_len=128)
    calls: list[tuple[int, ...]] = []
    block = model.model.layers[1].mlp
    handle = block.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    try:
        runner.prefill(0, [[5, 6, 7], [8, 9, 10]])
        calls.clear()
        runner.decode([11, 12], [3, 3])
    finally:
        handle.remove()
    assert calls == [(2, 1, 64)]  # one call, both rows


def test_moe_logits_match_hf_forward():
    torch.manual_seed(5)
    model = mixtral()
    prompt = list(range(40, 60))
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    runner = LlamaRunner(model, max_len=128)
    assert (runner.prefill(0, [prompt])[0] - ref).abs().max() < 1e-4


def test_moe_compile_request_runs_eager_with_a_warning():
    model = mixtral()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = LlamaRunner(model, max_len=64, compile=True)
    assert not runner.compiled and runner.step_fn is runner.core
    assert any("mixture-of-experts" in str(w.message) for w in caught)


def test_lm_moe_tiny_preset_is_on_the_fast_path():
    _, tok = tiny_random_llama()
    torch.manual_seed(6)
    model = create_lm(build_lm_config(LMSpec(preset="lm-moe-tiny"), tok)).eval()
    assert model.config.model_type == "mixtral"
    gen = BatchGenerator(model, tok, max_batch_size=2)
    assert gen.fast_path and all(b is not None for b in gen.runner.moe)


def test_dense_llama_has_no_moe_layers():
    model, tok = tiny_random_llama()
    gen = BatchGenerator(model, tok, max_batch_size=2)
    assert gen.fast_path and gen.runner.moe == [None, None]

