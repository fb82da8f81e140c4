"""LlamaRunner(prepack=True): the weights only in oneDNN's prepacked layout, the HF model's logits,
and one copy of the weights (the model's projections are released)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from genforge.models.fastdecode import LlamaRunner
from genforge.models.generation import BatchGenerator
from genforge.models.sampling import SamplingParams

from .test_generation import hf_reference, llama_config, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        if t.is_mkldnn:
            seen[id(t)] = t.numel() * t.element_size()
        elif t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("tie", [False, True])
def test_prepacked_runner_gives_the_hf_logits_and_holds_the_weights_once(tie):
    torch.manual_seed(2)
    m = LlamaForCausalLM(llama_config(tie_word_embeddings=tie)).eval()
    prompts = [list(range(5, 17)), list(range(30, 33)), list(range(100, 125))]
    ref, ref_tokens = hf_reference(m, prompts, steps=3)
    before = _bytes(m.parameters())
    runner = LlamaRunner(m, max_len=128, slots=2, prepack=True)
    assert runner.prepacked and runner.layers[0][1].is_mkldnn
    assert runner.lm_head.is_mkldnn != tie  # a tied lm_head is the embedding table, kept as is
    runner_tensors = [t for layer in runner.layers for t in layer] + [runner.embed, runner.norm_w, runner.lm_head]
    after = _bytes([*m.parameters(), *runner_tensors])
    assert after <= before  # the model's projections were released, not kept beside the packed ones
    assert m.model.layers[0].self_attn.q_proj.weight.numel() == 0
    assert (runner.prefill(0, prompts) - ref[0]).abs().max() < 1e-4
    toks, pos = [t[0] for t in ref_tokens], [len(p) for p in prompts]
    for s in range(1, 4):
        assert (runner.decode(toks, pos) - ref[s]).abs().max() < 1e-4
        toks, pos = [t[s] for t in ref_tokens], [p + 1 for p in pos]


def test_prepacked_generator_matches_the_unpacked_one_with_chunked_prefill():
    tok = tiny_tokenizer()
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5 + (i * 7 + j) % 300 for j in range(20 + 9 * i)] for i in range(4)]
    outs = []
    for prepack in (False, True):
        torch.manual_seed(0)
        m = LlamaForCausalLM(llama_config(len(tok))).eval()
        gen = BatchGenerator(m, tok, max_batch_size=4, max_prefill_tokens=16, prepack=prepack)
        assert gen.runner.prepacked == prepack
        outs.append([[e.token_id for e in gen.generate(p, params)] for p in prompts])
    assert outs[0] == outs[1]


def test_prepack_refuses_compile():
    m = LlamaForCausalLM(llama_config()).eval()
    with pytest.raises(ValueError, match="prepack"):
        LlamaRunner(m, max_len=32, prepack=True, compile=True)
