"""Decoder-only LMs: `transformers` model classes built from presets, saved in the HF layout.

Every model is a stock `transformers` class (LlamaForCausalLM for the dense presets,
MixtralForCausalLM for the mixture-of-experts one, Mamba2ForCausalLM for the state-space one), so a
run's `model/` folder loads with `AutoModelForCausalLM.from_pretrained` anywhere, and any HF
causal-LM folder loads here.

Why Mamba2 and not Mamba (1) for the state-space preset: without the CUDA kernels (mamba_ssm,
causal_conv1d) transformers runs Mamba's selective scan as a Python loop over the sequence, while
Mamba2's reference path is the chunked SSD form (a few einsums per chunk of `chunk_size` tokens).
Measured here (2-core CPU, one thread, hidden 256, 4 layers, batch 8 x 128 tokens, one AdamW step):
Mamba 29 s, Mamba2 1.2 s. Mamba2's chunk scan also starts from a cached state, so a prompt can be
prefilled in chunks; Mamba's reference scan always starts from zeros.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    Mamba2Config,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from genforge.common.config import Spec, rng
from genforge.common.errors import ConfigError, RunError
from genforge.models.quantize import check_method, compute_dtype, quantize_model, read_marker

# ChatML, the template most small chat models use; applied when a model folder has none.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template a tokenizer renders chats with, in training (SFT) and in `genforge serve`:
    its own, the default one of a set of named templates, or DEFAULT_CHAT_TEMPLATE."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own
    if isinstance(own, dict) and own.get("default"):
        return own["default"]
    return DEFAULT_CHAT_TEMPLATE


# name -> (config class, architecture). Sizes are counted with a 4096-token vocabulary
# (tied embeddings), except lm-base, which is GPT-2-small sized with a 32k vocabulary.
PRESETS: dict[str, dict] = {
    "lm-nano": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=384, context_length=256),
    "lm-tiny": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                    intermediate_size=1024, context_length=256),
    "lm-small": dict(hidden_size=640, num_hidden_layers=10, num_attention_heads=10, num_key_value_heads=5,
                     intermediate_size=1728, context_length=512),
    "lm-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                    intermediate_size=3072, context_length=1024),
    "lm-moe-tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=512, context_length=256, num_local_experts=4, num_experts_per_tok=2),
    # state-space (Mamba2): 2 x hidden channels in heads of `head_dim`, each carrying a state of
    # `state_size` per channel; the state is the whole "cache", the same size at any context length.
    # chunk_size 64: the reference chunk scan is quadratic within a chunk, linear across chunks.
    "lm-mamba-tiny": dict(hidden_size=256, num_hidden_layers=4, state_size=32, head_dim=32,
                          context_length=256, chunk_size=64),
}
STATE_SPACE = ("lm-mamba-tiny",)  # presets without attention (Mamba2ForCausalLM)
MAMBA_EXPAND = 2  # Mamba2's inner width is expand x hidden_size


class LMSpec(Spec):
    """The recipe's `model:` section for family `lm`: a preset and any overrides of it."""

    preset: str = rng("lm-tiny", choices=list(PRESETS))
    context_length: int | None = rng(None, min=8)
    hidden_size: int | None = rng(None, min=8)
    num_layers: int | None = rng(None, min=1)
    num_heads: int | None = rng(None, min=1)
    num_kv_heads: int | None = rng(None, min=1)
    intermediate_size: int | None = rng(None, min=8)
    num_experts: int | None = rng(None, min=2)
    experts_per_token: int | None = rng(None, min=1)
    state_size: int | None = rng(None, min=1)  # state-space presets: the SSM state per channel
    tie_embeddings: bool = True
    dropout: float = rng(0.0, min=0, max=0.9)
    rope_theta: float = rng(10000.0, min=1)
    initializer_range: float = rng(0.02, min=0, min_exclusive=True)

    def resolved(self) -> dict:
        """Preset values with this spec's overrides applied."""
        p = dict(PRESETS[self.preset])
        if self.preset in STATE_SPACE:
            return self._resolved_state_space(p)
        if self.state_size is not None:
            raise ConfigError(f"model.state_size: preset {self.preset} is a transformer; use lm-mamba-tiny "
                              f"for a state-space model")
        overrides = {"context_length": self.context_length, "hidden_size": self.hidden_size,
                     "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                     "num_key_value_heads": self.num_kv_heads, "intermediate_size": self.intermediate_size,
                     "num_local_experts": self.num_experts, "num_experts_per_tok": self.experts_per_token}
        p.update({k: v for k, v in overrides.items() if v is not None})
        if (self.num_experts or self.experts_per_token) and "num_local_experts" not in PRESETS[self.preset]:
            raise ConfigError(f"model.num_experts: preset {self.preset} is dense; use lm-moe-tiny for experts")
        if p["hidden_size"] % p["num_attention_heads"]:
            raise ConfigError(f"model.hidden_size: {p['hidden_size']} is not divisible by num_heads "
                              f"{p['num_attention_heads']}")
        if p["num_attention_heads"] % p["num_key_value_heads"]:
            raise ConfigError(f"model.num_kv_heads: {p['num_key_value_heads']} must divide num_heads "
                              f"{p['num_attention_heads']}")
        if "num_local_experts" in p and p["num_experts_per_tok"] > p["num_local_experts"]:
            raise ConfigError("model.experts_per_token: larger than num_experts")
        return p

    def _resolved_state_space(self, p: dict) -> dict:
        attention_only = {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads,
                          "intermediate_size": self.intermediate_size, "num_experts": self.num_experts,
                          "experts_per_token": self.experts_per_token}
        given = [k for k, v in attention_only.items() if v is not None]
        if given:
            raise ConfigError(f"model.{given[0]}: preset {self.preset} is a state-space model (no attention, "
                              f"no MLP); it takes hidden_size, num_layers, state_size and context_length")
        overrides = {"context_length": self.context_length, "hidden_size": self.hidden_size,
                     "num_hidden_layers": self.num_layers, "state_size": self.state_size}
        p.update({k: v for k, v in overrides.items() if v is not None})
        if (MAMBA_EXPAND * p["hidden_size"]) % p["head_dim"]:
            raise ConfigError(f"model.hidden_size: {p['hidden_size']} x {MAMBA_EXPAND} must be a multiple "
                              f"of the head size {p['head_dim']}")
        return p


def build_lm_config(spec: LMSpec, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    p = spec.resolved()
    if spec.preset in STATE_SPACE:
        return Mamba2Config(
            vocab_size=len(tokenizer), hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
            state_size=p["state_size"], expand=MAMBA_EXPAND, head_dim=p["head_dim"],
            num_heads=MAMBA_EXPAND * p["hidden_size"] // p["head_dim"], n_groups=1, conv_kernel=4,
            chunk_size=p["chunk_size"], max_position_embeddings=p["context_length"],
            tie_word_embeddings=spec.tie_embeddings, initializer_range=spec.initializer_range,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
    common = dict(
        vocab_size=len(tokenizer), hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
        intermediate_size=p["intermediate_size"], max_position_embeddings=p["context_length"],
        rms_norm_eps=1e-5, rope_theta=spec.rope_theta, attention_dropout=spec.dropout,
        tie_word_embeddings=spec.tie_embeddings, initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if "num_local_experts" in p:
        return MixtralConfig(**common, num_local_experts=p["num_local_experts"],
                             num_experts_per_tok=p["num_experts_per_tok"], router_aux_loss_coef=0.01)
    return LlamaConfig(**common, mlp_bias=False, attention_bias=False)


def create_lm(config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialised model; SDPA attention, the fastest kernel on CPU and CUDA here."""
    if is_state_space(config):  # no attention to choose a kernel for
        return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def is_state_space(config: PretrainedConfig) -> bool:
    """Whether a model config is a state-space LM (Mamba/Mamba2): no attention, no KV cache."""
    return getattr(config, "model_type", None) in ("mamba", "mamba2")


def count_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:  # tied embeddings count once
            seen.add(id(p))
            total += p.numel()
    return total


def save_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """Model, tokenizer, generation_config.json and chat template in the HF layout."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                     pad_token_id=model.config.pad_token_id, do_sample=True, temperature=0.8, top_p=0.95,
                     max_new_tokens=128).save_pretrained(out_dir)


def model_folder(path: str | Path) -> Path:
    """RUN/model for a genforge run directory, the folder itself for an HF model folder."""
    path = Path(path)
    if (path / "recipe.yaml").is_file():
        if not (path / "model" / "config.json").is_file():
            raise RunError(f"run {path} has no exported model yet (training not finished?); "
                           f"expected {path / 'model' / 'config.json'}")
        return path / "model"
    if not path.exists():
        raise RunError(f"model not found: {path} (expected a run directory or a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise RunError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX): there bf16 halves the bytes
    a decode step streams and its matmuls run faster than fp32; elsewhere bf16 is emulated and slower."""
    import torch.cpu as tcpu

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(tcpu, name, lambda: False)()) for name in probes)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """The weights' dtype for a `--dtype` value. "auto" is bf16 on a CUDA device that supports it
    and on a CPU with native bf16 (`cpu_has_fast_bf16`), fp32 elsewhere. None is fp32 (eval's
    full precision).

    Measured on a 2-core AVX512_BF16 EPYC (lm-tiny, batch 16, one thread, median CPU time of a
    decode step; benchmarks/decode_step.py): eager 9.0 ms fp32 -> 4.5 ms bf16 (as fast as the
    frozen fp32 compile, 4.7 ms), weights and KV cache halved; 20 greedy tokens agreed with fp32 on
    5 of 5 prompts of a trained char-level model."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if dev.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of auto, float32, bfloat16, float16", param="dtype")
    return _DTYPES[dtype]


def load_lm(path: str | Path, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a run's model or any HF causal-LM folder from disk. Remote code is never executed.

    `dtype`: a torch dtype or a `--dtype` name (see `resolve_dtype`); None keeps fp32 (eval's
    default: perplexities in full precision), "auto" picks bf16 on CUDA.
    A folder written by `genforge quantize` (a `quantization.json` beside the weights) is quantized
    after loading, in the dtype its method computes in (models/quantize.py).
    """
    folder = model_folder(path)
    torch_dtype = torch.float32 if dtype is None else resolve_dtype(dtype, device)
    method = read_marker(folder)
    if method is not None:
        check_method(method, device)  # before the weights are read
        torch_dtype = compute_dtype(method, dtype, torch_dtype)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        # Mamba has no attention to choose a kernel for
        attention = {} if is_state_space(config) else {"attn_implementation": "sdpa"}
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch_dtype,
                                                     trust_remote_code=False, **attention)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"cannot load a causal LM from {folder}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    model = model.to(device).eval()
    if method is not None:
        quantize_model(model, method)
    return model, tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a run or HF folder (detectors that re-tokenise text need no weights)."""
    folder = model_folder(path)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(f"cannot load a tokenizer from {folder}: {str(e).splitlines()[0]}") from None


def context_length(model: torch.nn.Module, max_model_len: int | None = None) -> int:
    """The context a generator serves: the model's positions, or `max_model_len` when given.

    The one place this is computed (eval, generation, serve). A `max_model_len` beyond the
    model's positions is refused: RoPE tables and learned positions end there.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = int(getattr(cfg, "max_position_embeddings", None) or 2048)
    if max_model_len is None:
        return limit
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 2 <= max_model_len <= limit:
        raise ConfigError(f"--max-model-len {max_model_len}: must be in [2, {limit}] (the model's context is "
                          f"{limit} tokens)", param="max_model_len")
    return max_model_len
