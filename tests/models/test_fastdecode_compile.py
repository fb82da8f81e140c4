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
