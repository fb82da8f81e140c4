"""The device path: every tensor the sampler, the KV cache and the decode step create is created on
the model's device, and `--dtype` names resolve (auto = bf16 on CUDA and on CPUs with native bf16, else fp32).

A stray `torch.tensor(...)` without `device=` is invisible on a CPU-only machine (everything is on
the CPU) and a crash on a CUDA model; so on the CPU the test records, through a torch function
mode, every tensor factory called from genforge's models package and requires each to name the
model's device. The CUDA run itself is tests/models/test_generation_cuda.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import LlamaForCausalLM

from genforge.common.errors import ConfigError
from genforge.models.generation import BatchGenerator
from genforge.models.lm import context_length, cpu_has_fast_bf16, load_lm, resolve_dtype, save_lm
from genforge.models.sampling import SamplingParams

from .test_generation import CORPUS, llama_config, tiny_tokenizer

_FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "linspace", "eye"}
_MODELS_DIR = str(Path(__file__).resolve().parents[2] / "src" / "genforge" / "models")


class FactoryRecorder(TorchFunctionMode):
    """Records tensor factories called from src/genforge/models without the model's device."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.strays: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _FACTORIES:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(_MODELS_DIR):
                dev = kwargs.get("device")
                if dev is None or torch.device(dev) != self.device:
                    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                    self.strays.append(f"torch.{func.__name__} at {where} (device={dev!r})")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _all_kinds_of_rows(tok) -> list[tuple[list[int], SamplingParams]]:
    prompts = [tok.encode(t) for t in CORPUS]
    kinds = [
        SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True),
        SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=5, seed=1, logprobs=3),
        SamplingParams(max_new_tokens=6, temperature=1.2, seed=2, min_tokens=3, presence_penalty=0.5,
                       repetition_penalty=1.3, frequency_penalty=0.2, logprobs=0),
        SamplingParams(max_new_tokens=6, temperature=0.7, top_p=1e-6, seed=3, stop_token_ids=[5]),
    ]
    return list(zip(prompts, kinds))


@pytest.mark.parametrize("fast", [True, False])
def test_every_tensor_factory_names_the_model_device(tok, fast):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(len(tok))).eval()
    recorder = FactoryRecorder(torch.device("cpu"))
    with recorder:
        gen = BatchGenerator(model, tok, max_batch_size=4, fast=fast)
        seqs = [gen.new_sequence(p, sp) for p, sp in _all_kinds_of_rows(tok)]
        gen.add(seqs[:2])
        gen.step()
        gen.add(seqs[2:])
        for _ in range(8):
            gen.step()
    assert recorder.strays == []


def test_recorder_catches_a_stray_factory():
    """The check above would fail: a factory without device= called from models/ is recorded."""
    recorder = FactoryRecorder(torch.device("cpu"))
    code = compile("torch.tensor([1, 2])", str(Path(_MODELS_DIR) / "stray.py"), "exec")
    with recorder:
        exec(code, {"torch": torch})
        torch.tensor([1, 2])  # from a test file: not the models package, not recorded
    assert len(recorder.strays) == 1 and "stray.py" in recorder.strays[0]


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ConfigError) as e:
        resolve_dtype("int8", "cpu")
    assert e.value.param == "dtype" and "--dtype" in e.value.message


def test_load_lm_takes_dtype_names(tmp_path, tok):
    torch.manual_seed(0)
    save_lm(LlamaForCausalLM(llama_config(len(tok))).eval(), tok, tmp_path / "m")
    model, _ = load_lm(tmp_path / "m", "cpu", "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_lm(tmp_path / "m", "cpu", "auto")
    assert next(model.parameters()).dtype == resolve_dtype("auto", "cpu")
    model, _ = load_lm(tmp_path / "m", "cpu")
    assert next(model.parameters()).dtype == torch.float32  # None: eval's full precision


@pytest.mark.parametrize("bf16, amx, want", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                             (False, False, torch.float32)])
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, bf16, amx, want):
    import torch.cpu as tcpu

    monkeypatch.setattr(tcpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(tcpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("auto", "cpu") == want
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype("float32", "cpu") == torch.float32


def test_max_model_len_beyond_the_model_is_refused(tok):
    model = LlamaForCausalLM(llama_config(len(tok))).eval()  # 128 positions
    assert context_length(model) == 128 and context_length(model, 64) == 64
    with pytest.raises(ConfigError) as e:
        BatchGenerator(model, tok, max_model_len=4096)
    assert e.value.param == "max_model_len" and "128" in e.value.message
