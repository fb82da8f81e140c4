"""Export to ONNX with torch.onnx (the dynamo exporter, torch's default): a causal LM whose KV cache
is an input and an output, so onnxruntime generates incrementally, and a diffusers UNet (the scheduler
loop stays in Python); int8 through onnxruntime's `quantize_dynamic`.

`optimum-onnx` would be the field's exporter, but every release of it pins transformers < 4.58 and this
project runs transformers 5; so the LM is wrapped here the way optimum lays it out (inputs `input_ids`,
`attention_mask`, `position_ids`, `past_key_values.{i}.key|value`; outputs `logits`,
`present.{i}.key|value`), and an export folder reads like an optimum one.

A failure inside the exporter is turned into an ExportError that names the operator it could not
translate (`aten.linalg_eig`, `transformers.grouped_mm_fallback`, ...), found in the exporter's message.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import torch

from genforge.common.errors import GenforgeError

OPSET = 18  # the dynamo exporter's own opset; onnxruntime 1.2x runs it on every execution provider


class ExportError(GenforgeError):
    """The exporter could not turn the model into ONNX; the message names the operator when it can."""


def require(*modules: str) -> None:
    """A one-line error, not an ImportError, when the `onnx` extra is missing: the exporter needs onnx and
    onnxscript, generation onnxruntime."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise GenforgeError(f"{', '.join(missing)} not installed; install the onnx extra: pip install 'genforge[onnx]'")


# ------------------------------------------------------------------------------------------- the LM

def lm_cache_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a causal LM's KV cache."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(cfg.num_hidden_layers), kv_heads, head_dim


def lm_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The exported LM's input and output names (optimum's)."""
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class CausalLMWithCache(torch.nn.Module):
    """A transformers causal LM whose KV cache goes in and out as plain tensors (key, value per
    layer, B x kv_heads x T x head_dim), which is what an ONNX graph can take and return."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = lm_cache_shape(model.config)[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_causal_lm(model: torch.nn.Module, path: str | Path, opset: int = OPSET) -> dict:
    """Write `model` (a transformers causal LM, eval mode, fp32) to the ONNX file `path` with batch,
    sequence and past-length axes dynamic; return the inputs/outputs description for the export record."""
    layers, kv_heads, head_dim = lm_cache_shape(model.config)
    if hasattr(model, "set_experts_implementation"):  # MoE: transformers' default grouped_mm has no ONNX
        with contextlib.suppress(ValueError, AttributeError, NotImplementedError):  # dense models refuse
            model.set_experts_implementation("batched_mm")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    # example sizes all different and > 1, so the exporter specialises none of them to a constant
    batch, seq, past_len = 2, 3, 4
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq)[None].expand(batch, -1)
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    shapes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: t}, "position_ids": {0: b, 1: s},
              "past": [{0: b, 2: p} for _ in range(2 * layers)]}
    inputs, outputs = lm_io_names(layers)
    run_exporter(CausalLMWithCache(model).eval(), (ids, mask, positions, past), path, inputs, outputs, shapes, opset,
                 what=type(model).__name__)
    return {"inputs": {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, past + sequence]",
                       "position_ids": "int64 [batch, sequence]",
                       "past_key_values.{i}.key|value": f"float32 [batch, {kv_heads}, past, {head_dim}], "
                                                        f"i in 0..{layers - 1}"},
            "outputs": {"logits": f"float32 [batch, sequence, {vocab}]",
                        "present.{i}.key|value": f"float32 [batch, {kv_heads}, past + sequence, {head_dim}]"},
            "num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab}


# ------------------------------------------------------------------------------------------- UNets

class UNetNoise(torch.nn.Module):
    """A diffusers UNet's noise prediction as one tensor; `cond` is the class labels (UNet2DModel)
    or the text encoder's states (UNet2DConditionModel), or absent for an unconditional UNet."""

    def __init__(self, unet: torch.nn.Module, cond: str | None):
        super().__init__()
        self.unet, self.cond = unet, cond

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {self.cond: cond} if self.cond else {}
        return self.unet(sample, timestep, **kwargs, return_dict=False)[0]


def unet_condition(unet: torch.nn.Module) -> str | None:
    """Which conditioning input the UNet takes: "class_labels", "encoder_hidden_states" or None."""
    if getattr(unet.config, "cross_attention_dim", None) is not None:
        return "encoder_hidden_states"
    return "class_labels" if getattr(unet.config, "num_class_embeds", None) else None


def unet_example(unet: torch.nn.Module, batch: int, seed: int = 0, text_tokens: int = 5,
                 num_train_timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """Random inputs of the UNet's shapes (timesteps spread over the schedule), keyed by ONNX input name;
    a class-conditional UNet's last row takes the null class."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    out = {"sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),
           "timestep": torch.linspace(num_train_timesteps - 1, 0, batch).round()}
    cond = unet_condition(unet)
    if cond == "class_labels":
        labels = torch.arange(batch) % int(cfg.num_class_embeds)
        labels[-1] = int(cfg.num_class_embeds) - 1
        out[cond] = labels
    elif cond == "encoder_hidden_states":
        out[cond] = torch.randn(batch, text_tokens, int(cfg.cross_attention_dim), generator=g)
    return out


def export_unet(unet: torch.nn.Module, path: str | Path, opset: int = OPSET) -> dict:
    """Write the UNet's noise prediction to `path`: inputs `sample` [batch, C, H, W], `timestep`
    (float32 [batch]) and `class_labels` (int64 [batch]) or `encoder_hidden_states` (float32 [batch,
    tokens, D]); output `noise_pred`. Batch and the text's token count are dynamic."""
    cond = unet_condition(unet)
    example = unet_example(unet, batch=3)
    b = torch.export.Dim("batch")
    shapes: dict = {"sample": {0: b}, "timestep": {0: b}}
    if cond == "class_labels":
        shapes["cond"] = {0: b}
    elif cond == "encoder_hidden_states":
        shapes["cond"] = {0: b, 1: torch.export.Dim("tokens")}
    run_exporter(UNetNoise(unet, cond).eval(), tuple(example.values()), path, list(example), ["noise_pred"],
                 shapes, opset, what=type(unet).__name__)
    dims = {"sample": "float32 [batch, channels, height, width]", "timestep": "float32 [batch]",
            "class_labels": "int64 [batch] (the last index is the null class)",
            "encoder_hidden_states": "float32 [batch, tokens, hidden]"}
    return {"inputs": {k: dims[k] for k in example}, "outputs": {"noise_pred": "float32 [batch, channels, height, "
                                                                             "width]"}, "condition": cond}


# ------------------------------------------------------------------------------------------- the exporter

def unsupported_operator(message: str) -> str | None:
    """The operator an exporter error is about (`aten.linalg_eig`), or None when it names none."""
    for pattern in (r"OpOverload\(op='([\w.:]+)'", r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]",
                    r"\b(aten::\w+)", r"\b(aten\.\w+)"):
        if m := re.search(pattern, message):
            return m.group(1)
    return None


def run_exporter(module: torch.nn.Module, args: tuple, path: str | Path, input_names: list[str],
                 output_names: list[str], dynamic_shapes, opset: int, what: str = "the model") -> None:
    """torch.onnx.export (dynamo) to `path`, its progress lines and advisory warnings kept off the
    terminal; an ExportError naming the operator when it fails."""
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes about axis names and deprecations
            program = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True,
                                        verbose=False)
    except Exception as e:  # the exporter raises torch.export's, its own and the model's errors alike
        message = str(e)
        op = unsupported_operator(message)
        summary = next((line.strip() for line in message.splitlines() if line.strip()), type(e).__name__)
        if op is not None:
            raise ExportError(f"ONNX export of {what} failed at operator {op}: torch.onnx (opset {opset}) has no "
                              f"ONNX translation for it; this model cannot be exported as is") from None
        raise ExportError(f"ONNX export of {what} failed: {summary[:300]}") from None
    program.save(str(path))


def quantize_int8(source: str | Path, target: str | Path) -> None:
    """onnxruntime's dynamic int8 quantization: int8 weights of MatMul/Gemm (and Conv), activations
    quantized per call; the graph is shape-inferred and optimized first, as onnxruntime's docs ask (ONNX
    shape inference only: onnxruntime's symbolic pass stops at the exporter's cache-length expressions)."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    source, target = Path(source), Path(target)
    prepared = target.with_name(target.stem + ".pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    except Exception as e:  # onnxruntime.quantization raises plain Exceptions
        summary = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ExportError(f"int8 quantization of the exported graph failed: {summary[:300]}") from None
    finally:
        prepared.unlink(missing_ok=True)
