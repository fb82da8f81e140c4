"""The compiled decode step's start-up: a background compile while the eager step serves, and the
per-user folder inductor keeps its kernels in."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaForCausalLM

from genforge.models import fastdecode
from genforge.models.fastdecode import LlamaRunner, compile_cache_dir

from .test_generation import hf_reference, llama_config


@pytest.mark.slow
def test_background_compile_serves_eager_then_switches_with_the_same_logits():
    """Rows decode (eager) while the compile runs in its thread; its warm-up writes into a scratch
    cache, so the served rows' logits stay the HF model's before, during and after the switch."""
    torch.manual_seed(4)
    m = LlamaForCausalLM(llama_config()).eval()
    prompts = [list(range(5, 17)), list(range(30, 33)), list(range(100, 125))]
    steps = 8
    ref, ref_tokens = hf_reference(m, prompts, steps=steps)
    runner = LlamaRunner(m, max_len=128, slots=2, compile="background")
    assert not runner.compiled  # construction does not wait for the compile
    assert (runner.prefill(0, prompts) - ref[0]).abs().max() < 1e-4
    toks, pos = [t[0] for t in ref_tokens], [len(p) for p in prompts]
    seen = set()
    for s in range(1, steps + 1):
        if s == steps // 2:
            assert runner.wait_compiled(timeout=900)
        seen.add(runner.compiled)
        assert (runner.decode(toks, pos) - ref[s]).abs().max() < 1e-4, s
        toks, pos = [t[s] for t in ref_tokens], [p + 1 for p in pos]
    assert seen == {False, True} and runner.step_fn is not runner.core


def test_compile_argument_is_checked():
    m = LlamaForCausalLM(llama_config()).eval()
    with pytest.raises(ValueError, match="compile"):
        LlamaRunner(m, max_len=32, compile="yes")


def test_compile_cache_folder_is_per_user_and_respects_a_chosen_one(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == os.path.join(str(tmp_path), "genforge", "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    fastdecode._use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == compile_cache_dir()
    assert os.path.isdir(compile_cache_dir())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    fastdecode._use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def _weight_copies(model: torch.nn.Module, runner: LlamaRunner | None = None) -> int:
    """Bytes of live tensors of a weight matrix's size or more that are not the model's storage
    (nor views of it, nor the runner's RoPE tables): copies of the weights, e.g. prepacked by a
    frozen compile."""
    import gc

    gc.collect()
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    if runner is not None:
        own |= {runner.cos.untyped_storage().data_ptr(), runner.sin.untyped_storage().data_ptr()}
    smallest = min(p.numel() for p in model.parameters() if p.dim() == 2)
    total, seen = 0, set()
    for obj in gc.get_objects():
        # real tensors only (the compiler's fake and functional tensors hold no memory)
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or id(obj) in seen or obj.numel() < smallest:
            continue
        seen.add(id(obj))
        if obj.is_mkldnn:  # opaque prepacked weights
            total += obj.numel() * obj.element_size()
            continue
        if obj.untyped_storage().data_ptr() not in own and obj.dim() == 2:
            total += obj.untyped_storage().nbytes()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True])
def test_compiled_step_keeps_one_copy_of_the_weights(freeze):
    """The compiled decode step reads the runner's (= the model's) weights; only freeze=True,
    whose oneDNN prepacking copies every matrix, holds them twice."""
    torch._dynamo.reset()  # an earlier unfrozen graph of the same shapes would serve freeze=True too
    torch.manual_seed(5)
    m = LlamaForCausalLM(llama_config(tie_word_embeddings=False)).eval()
    prompts = [list(range(5, 17)), list(range(30, 40))]
    ref, ref_tokens = hf_reference(m, prompts, steps=1)
    before = _weight_copies(m)
    runner = LlamaRunner(m, max_len=128, slots=2, compile=True, freeze=freeze)
    assert runner.compiled
    runner.prefill(0, prompts)
    assert (runner.decode([t[0] for t in ref_tokens], [len(p) for p in prompts]) - ref[1]).abs().max() < 1e-4
    matrices = sum(p.numel() * p.element_size() for p in m.parameters() if p.dim() == 2)
    extra = _weight_copies(m, runner) - before
    if freeze:
        assert extra >= matrices // 2  # the test sees the copy when there is one
    else:
        assert extra == 0
