"""BatchGenerator on CUDA, greedy and sampled, fp32 and bf16 (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from genforge.models.generation import BatchGenerator
from genforge.models.sampling import SamplingParams

from .test_generation import CORPUS, llama_config, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def cpu_model(tok):
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(len(tok))).eval()


def _run(model, tok, params: list[SamplingParams], fast: bool = True) -> list[list[int]]:
    gen = BatchGenerator(model, tok, max_batch_size=4, fast=fast)
    seqs = [gen.new_sequence(tok.encode(t), p) for t, p in zip(CORPUS, params)]
    out: dict[int, list[int]] = {i: [] for i in range(len(seqs))}
    events = gen.add(seqs)
    while events:
        for s, ev in events:
            out[seqs.index(s)].append(ev.token_id)
        events = gen.step()
    return [out[i] for i in range(len(seqs))]


def _on_cuda(cpu_model, dtype=torch.float32):
    model = LlamaForCausalLM(cpu_model.config).eval()
    model.load_state_dict(cpu_model.state_dict())
    return model.to("cuda", dtype)


@pytest.mark.parametrize("fast", [True, False])
def test_cuda_fp32_greedy_equals_cpu(tok, cpu_model, fast, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # tf32 is not fp32 to 1e-4
    greedy = [SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)] * 4
    ref = _run(cpu_model, tok, greedy, fast)
    assert _run(_on_cuda(cpu_model), tok, greedy, fast) == ref


@pytest.mark.parametrize("fast", [True, False])
def test_cuda_factories_name_the_model_device(tok, cpu_model, fast):
    from .test_generation_device import FactoryRecorder, _all_kinds_of_rows

    model = _on_cuda(cpu_model)
    recorder = FactoryRecorder(next(model.parameters()).device)
    with recorder:
        gen = BatchGenerator(model, tok, max_batch_size=4, fast=fast, max_prefill_tokens=8)
        gen.add([gen.new_sequence(p, sp) for p, sp in _all_kinds_of_rows(tok)])
        for _ in range(10):
            gen.step()
    assert recorder.strays == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sampled_and_greedy_run_and_seeds_hold(tok, cpu_model, dtype):
    model = _on_cuda(cpu_model, dtype)
    mixed = [SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True),
             SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True, logprobs=2),
             SamplingParams(max_new_tokens=8, temperature=1.1, top_k=7, seed=6, ignore_eos=True,
                            presence_penalty=0.5, min_tokens=2),
             SamplingParams(max_new_tokens=8, temperature=0.7, seed=7, ignore_eos=True)]
    together = _run(model, tok, mixed)
    assert all(len(t) == 8 and all(0 <= x < len(tok) for x in t) for t in together)
    gen = BatchGenerator(model, tok, max_batch_size=1)
    alone = [e.token_id for e in gen.generate(tok.encode(CORPUS[1]), mixed[1])]
    if dtype == torch.float32:  # bf16 batched matmuls may round differently from a batch of one
        assert alone == together[1]
