"""Memory: the fast path holds the weights once, the KV cache stays within its byte budget, and
the fast path is reported by a property (not by comparing class names)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from genforge.common.errors import ConfigError
from genforge.models.fastdecode import LlamaRunner
from genforge.models.generation import BatchGenerator
from genforge.models.kvcache import device_kv_budget, fit_kv_budget, kv_bytes_per_position
from genforge.models.sampling import SamplingParams

from .test_generation import hf_reference, llama_config, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _storage_bytes(tensors) -> tuple[int, set[int]]:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values()), set(seen)


@pytest.mark.parametrize("make", [
    lambda: LlamaForCausalLM(llama_config(tie_word_embeddings=False)),
    lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)),
])
def test_fast_path_keeps_one_copy_of_the_weights(make):
    torch.manual_seed(0)
    model = make().eval()
    before, _ = _storage_bytes(model.parameters())
    prompts = [list(range(5, 17)), list(range(30, 40))]
    ref, _ = hf_reference(model, prompts, steps=0)
    runner = LlamaRunner(model, max_len=128)
    runner_tensors = [t for layer in runner.layers for t in layer] + [runner.embed, runner.norm_w, runner.lm_head]
    total, ptrs = _storage_bytes([*model.parameters(), *runner_tensors])
    assert total == before  # the runner's fused tensors are the model's storage, not a copy
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == runner.layers[0][1].untyped_storage().data_ptr()
    # the model still computes what it did, through the views
    again, _ = hf_reference(model, prompts, steps=0)
    assert torch.equal(ref[0], again[0])
    assert (runner.prefill(0, prompts) - ref[0]).abs().max() < 1e-4


def test_kv_budget_trims_the_batch_and_refuses_what_cannot_fit(tok):
    per = kv_bytes_per_position(2, 2, 16, torch.float32)
    assert per == 2 * 2 * 2 * 16 * 4
    assert fit_kv_budget(per, 8, 128, None) == 8
    with pytest.warns(UserWarning, match="--max-batch-size 8 trimmed to 2"):
        assert fit_kv_budget(per, 8, 128, per * 128 * 2 + 5) == 2
    with pytest.raises(ConfigError) as e:
        fit_kv_budget(per, 8, 128, per * 100)
    msg = e.value.message
    assert e.value.param == "kv_cache_bytes" and "--kv-cache-memory" in msg and "--max-model-len" in msg
    assert "at most 100" in msg


def test_kv_cache_never_grows_past_its_budget(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tok))).eval()  # 128 positions
    per = kv_bytes_per_position(2, 2, 16, torch.float32)
    budget = per * 128 * 3
    with pytest.warns(UserWarning, match="trimmed to 3"):
        gen = BatchGenerator(model, tok, max_batch_size=8, kv_cache_bytes=budget)
    assert gen.max_batch_size == 3 and gen.free_slots == 3
    seqs = [gen.new_sequence(list(range(1, 100 + i)), SamplingParams(max_new_tokens=20, temperature=0,
                                                                     ignore_eos=True)) for i in range(3)]
    gen.add(seqs)
    while gen.rows:
        gen.step()
        assert gen.runner.cache.nbytes() <= budget
    with pytest.raises(ConfigError, match="--kv-cache-memory"):
        BatchGenerator(model, tok, max_batch_size=8, kv_cache_bytes=per * 127)


def test_fast_path_property(tok):
    model = LlamaForCausalLM(llama_config(len(tok))).eval()
    assert BatchGenerator(model, tok, max_batch_size=2).fast_path
    assert not BatchGenerator(model, tok, max_batch_size=2, fast=False).fast_path
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=4, num_experts_per_tok=2,
                                           max_position_embeddings=128)).eval()
    assert BatchGenerator(moe, tok, max_batch_size=2).fast_path  # its MoE blocks run on the batch
    assert not BatchGenerator(moe, tok, max_batch_size=2, fast=False).fast_path


def test_cuda_default_budget_is_the_free_memory(monkeypatch):
    assert device_kv_budget("cpu") is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert device_kv_budget("cuda") == 900
    with pytest.raises(ConfigError) as e:
        fit_kv_budget(10, 4, 128, 900, source="the GPU's free memory")
    assert "the GPU's free memory" in e.value.message and "--max-model-len" in e.value.message


def test_a_budget_below_one_position_does_not_suggest_a_context_of_zero():
    from genforge.models.kvcache import fit_kv_budget

    with pytest.raises(ConfigError) as e:
        fit_kv_budget(3072, 8, 256, 1024)
    assert "at least 786432" in str(e.value) and "--max-model-len to at most" not in str(e.value)
    with pytest.raises(ConfigError, match="--max-model-len to at most 10"):
        fit_kv_budget(3072, 8, 256, 3072 * 10)
