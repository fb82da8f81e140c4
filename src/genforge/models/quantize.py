"""Post-training quantization of a causal LM's linear layers, and the marker that loads a folder quantized.

    int8-dynamic   torch.ao dynamic quantization: int8 weights per output channel, activations
                   quantized per batch at run time, fbgemm/oneDNN int8 matmuls. CPU only, float32
                   activations. The fastest of the three on an x86 CPU (VNNI).
    int8-weight    torchao Int8WeightOnlyConfig: int8 weights per output channel, the matmul in
                   the activations' dtype (float32 or bfloat16). CPU and CUDA.
    int4-weight    torchao Int4WeightOnlyConfig: int4 weights in groups of 64, tile-packed for
                   CUDA's int4 kernels, bfloat16 activations. CUDA only: torchao 0.18's CPU int4
                   layouts need kernel packages it does not ship (checked with torch 2.13).

A method the device cannot run is a ConfigError that names it and why, never a quiet fallback.
The output head stays in full precision, as transformers' quantizers keep it: it is the layer whose
rounding costs the most perplexity, and with tied embeddings it is also the input table.

A quantized folder is an ordinary HF folder with the full-precision weights plus
`quantization.json` ({"method": ...}); `load_lm` re-applies the method after loading. Why not
save the quantized state dict: torch.ao's packed weights and torchao's tensor subclasses are
stored only through pickle (loading one runs code, which genforge never does for a folder on disk)
and are tied to the library version and CPU backend that wrote them. safetensors of the fp weights
load anywhere (plain transformers gets the fp model), and quantizing them is deterministic (round to
nearest), so every load gets the same int8/int4 weights, in well under a second for these models.
The cost is disk: the folder is as large as the fp one; `quantized_state_bytes` gives the size the
quantized weights take.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from genforge.common.errors import ConfigError

METHODS = ("int8-dynamic", "int8-weight", "int4-weight")
MARKER = "quantization.json"
INT4_GROUP = 64  # divides the hidden sizes of the presets and of common small models (576, 960, 2048)


def unsupported(method: str, device: str | torch.device = "cpu") -> str | None:
    """Why `method` cannot run on `device` here (None if it can)."""
    dev = torch.device(device).type
    if method == "int8-dynamic":
        if dev != "cpu":
            return "torch.ao's dynamic int8 kernels (fbgemm/oneDNN) run on the CPU only; use int8-weight on a GPU"
        if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
            return "this torch build has no quantized CPU engine (fbgemm, x86, onednn or qnnpack)"
        return None
    try:
        _torchao()
    except ImportError:
        return "it needs torchao (pip install 'genforge[quant]')"
    if method == "int4-weight" and dev != "cuda":
        return ("torchao's int4 weight-only kernels run on CUDA only (tile-packed bfloat16; its CPU int4 "
                "layouts need kernel packages that are not installed); use int8-dynamic or int8-weight here")
    return None


def check_method(method: str, device: str | torch.device = "cpu") -> None:
    """A ConfigError naming the method when it is unknown or `device` cannot run it."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: expected one of {', '.join(METHODS)}", param="method")
    why = unsupported(method, device)
    if why:
        raise ConfigError(f"--method {method} cannot run on {torch.device(device).type}: {why}", param="method")


def compute_dtype(method: str, requested: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """The dtype the non-quantized parts and the activations use. `default` is what the caller
    would pick for a plain model; an explicit dtype the method's kernels cannot take is refused."""
    need = {"int8-dynamic": torch.float32, "int4-weight": torch.bfloat16}.get(method)
    if need is None:
        return default
    explicit = requested not in (None, "auto")
    if explicit and default != need:
        raise ConfigError(f"--dtype {requested}: a model quantized with {method} computes in "
                          f"{str(need).removeprefix('torch.')}", param="dtype")
    return need


def _torchao():
    import torchao.quantization as tq  # its import-time warnings are silenced in genforge/__init__.py

    return tq


def _quantizable(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def quantize_model(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """Quantize the model's linear layers (the output head excepted) in place; returns the model.
    The model must already be on the device and in the dtype it will run in (`compute_dtype`)."""
    device = next(model.parameters()).device
    check_method(method, device)
    names = [n for n, m in model.named_modules() if _quantizable(m, n)]
    if not names:
        raise ConfigError(f"--method {method}: the model has no linear layers to quantize", param="method")
    if method == "int8-dynamic":
        # torch.ao's eager quantization is deprecated in favour of torchao, but torchao's dynamic int8
        # matmul measured 4x slower than fp32 on this 2-core x86 CPU and torch.ao's 3.7x faster
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            return torch.ao.quantization.quantize_dynamic(model, set(names), dtype=torch.qint8, inplace=True)
    tq = _torchao()
    if method == "int8-weight":
        config = tq.Int8WeightOnlyConfig()
    else:
        odd = [n for n in names if model.get_submodule(n).in_features % INT4_GROUP]
        if odd:
            raise ConfigError(f"--method int4-weight: {odd[0]} has {model.get_submodule(odd[0]).in_features} "
                              f"inputs, not a multiple of the group size {INT4_GROUP}", param="method")
        config = tq.Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
    chosen = set(names)
    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen)
    return model


def read_marker(folder: str | Path) -> str | None:
    """The method a folder's `quantization.json` names (None for a plain folder)."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        method = json.loads(path.read_text(encoding="utf-8")).get("method")
    except (json.JSONDecodeError, AttributeError):
        method = None
    if method not in METHODS:
        raise ConfigError(f"{path}: expected {{\"method\": one of {', '.join(METHODS)}}}", param="model")
    return method


def write_marker(folder: str | Path, method: str, **extra: object) -> None:
    record = {"method": method, "skipped": ["lm_head"], **extra}
    (Path(folder) / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def quantized_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's state dict as torch.save writes it (tied tensors once): for a quantized
    model, the size its weights take stored quantized."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buf)
    return buf.tell()
