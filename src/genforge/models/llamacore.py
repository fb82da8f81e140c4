"""The transformer that `LlamaRunner` (models/fastdecode.py) runs over its KV cache: which models it
covers, their weights fused and optionally prepacked, and the forward over L new tokens per row.

It runs the weights of a Llama-style transformers model (Llama, Mistral, Qwen2 without sliding
window; Mixtral and Qwen2-MoE) directly: fused qkv and gate/up matmuls, RoPE applied to q and k in
one go, and one `scaled_dot_product_attention` per layer with a per-row length mask, about 15
kernels per layer. The model's q/k/v and gate/up weights become views into the fused tensors, so the
weights are in memory once. It must give the HF model's logits (tests check max |diff| < 1e-4 in fp32).

Mixture of experts (Mixtral, Qwen2-MoE): attention runs as above; a layer whose MLP is a sparse MoE
block runs that block itself, the model's own module (router, top-k, experts, and a shared expert
where the model has one), on all the batch's tokens at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from genforge.models.multilora import MultiLora

if TYPE_CHECKING:
    from genforge.models.fastdecode import LlamaRunner

_FAST_TYPES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # frequencies do not change with length


def fast_path_unsupported(model: torch.nn.Module, max_len: int | None = None) -> str | None:
    """Why `LlamaRunner` cannot run `model` for contexts of `max_len` (None if it can)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _FAST_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not Llama-style"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and window < (max_len or cfg.max_position_embeddings):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in _STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r} changes with length"
    layer = inner.layers[0]
    if not all(hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention without q/k/v/o projections"
    if not all(is_gated_mlp(lay.mlp) or _is_moe_block(lay.mlp) for lay in inner.layers):
        return "MLP is neither gated nor a sparse mixture-of-experts block"
    if hasattr(layer.self_attn, "q_norm"):
        return "per-head q/k norms"
    linear = layer.self_attn.q_proj
    if not isinstance(linear, torch.nn.Linear) or type(linear.weight.data) is not torch.Tensor:
        return "quantized weights (models/quantize.py): the model's own quantized linears run them"
    return None


def is_gated_mlp(mlp: torch.nn.Module) -> bool:
    return all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


def _is_moe_block(mlp: torch.nn.Module) -> bool:
    """A transformers sparse MoE block: a router (`gate`) and the experts, called on [n, L, hidden]."""
    return hasattr(mlp, "gate") and hasattr(mlp, "experts")


def _run_moe(block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = block(h)
    return out[0] if isinstance(out, tuple) else out  # some blocks also return their router logits


@torch.no_grad()
def fuse_linears(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears that read the same input: one matmul, not three.

    The model's own Linear weights become views into the fused tensor, so memory holds one copy
    of the weights, not the model's plus the runner's.
    """
    if len(linears) == 1:
        lin = linears[0]
        return lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    weight = torch.cat([lin.weight.detach() for lin in linears], 0)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                          for lin in linears])
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight.data = weight[start:end]
        if lin.bias is not None:
            lin.bias.data = bias[start:end]
        start = end
    return weight, bias


WEIGHT_NAMES = ("w_in", "wqkv", "bqkv", "wo", "bo", "w_post", "wgu", "bgu", "wd", "bd")


class LayerWeights(torch.nn.Module):
    """One layer's fused weights as buffers (buffers, so a frozen compile (freeze=True) can prepack them)."""

    def __init__(self, tensors: dict[str, torch.Tensor | None]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)


class LlamaCore(torch.nn.Module):
    """The transformer over L new tokens per row, for prefill (L = a chunk) and decode (L = 1).

    Inputs: `x` [n, L, hidden] embeddings; `cos`/`sin` [n, L, H + 2Hkv, D] RoPE tables at each
    token's position; `mask` [n, 1, rep*L or 1, span] (key t visible to a query); the KV-cache
    write targets `write_rows`/`write_pos` [m] for the new tokens kept by `keep` (flat indices
    into n*L; None = all); `read_rows` the cache rows attended (None = rows 0..n-1, a view).
    The new keys and values are written first, then each row attends to its cache: the causal
    mask's offset by the cached length is in `mask`. Returns the logits of each row's last token.
    """

    def __init__(self, runner: LlamaRunner):
        super().__init__()
        self.H, self.Hkv, self.D, self.rep = runner.H, runner.Hkv, runner.D, runner.rep
        self.hidden, self.eps, self.act = runner.hidden, runner.eps, runner.act
        self.layers = torch.nn.ModuleList(LayerWeights(dict(zip(WEIGHT_NAMES, w))) for w in runner.layers)
        self.final = LayerWeights({"norm": runner.norm_w, "lm_head": runner.lm_head})
        self.moe = runner.moe  # per layer: the model's own sparse MoE block, or None (a gated MLP)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                write_rows: torch.Tensor, write_pos: torch.Tensor, keep: torch.Tensor | None,
                read_rows: torch.Tensor | slice | None, caches: list[torch.Tensor],
                lora: tuple[MultiLora, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        n, L, span = x.shape[0], x.shape[1], mask.shape[-1]
        H, Hkv, D, rep = self.H, self.Hkv, self.D, self.rep

        def proj(i: int, group: str, inp: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            out = _linear(inp, wt, b)
            if lora is not None and (d := lora[0].delta(i, group, inp, lora[1])) is not None:
                out = out + d  # each row's own adapter (slot 0: zeros); models/multilora.py
            return out

        for i, (w, cache) in enumerate(zip(self.layers, caches)):
            h = F.rms_norm(x, (self.hidden,), w.w_in, self.eps)
            qkv = _rope(proj(i, "qkv", h, w.wqkv, w.bqkv).view(n, L, H + 2 * Hkv, D), cos, sin)
            new_kv = qkv[:, :, H:].reshape(n * L, 2 * Hkv, D)
            cache[write_rows, :, write_pos] = new_kv if keep is None else new_kv[keep]  # one indexed copy
            kv = cache[:n, :, :span] if read_rows is None else cache[read_rows, :, :span]
            # GQA without repeating keys: the `rep` query heads that share a kv head stand in the
            # query axis of that head, next to the L query positions.
            if L == 1:  # decode: the same layout without the permutes (fewer ops in the eager step)
                q = qkv[:, 0, :H].view(n, Hkv, rep, D)
            else:
                q = qkv[:, :, :H].reshape(n, L, Hkv, rep, D).permute(0, 2, 3, 1, 4).reshape(n, Hkv, rep * L, D)
            att = F.scaled_dot_product_attention(q, kv[:, :Hkv], kv[:, Hkv:], attn_mask=mask)
            if L == 1:
                att = att.reshape(n, 1, H * D)
            else:
                att = att.view(n, Hkv, rep, L, D).permute(0, 3, 1, 2, 4).reshape(n, L, H * D)
            x = x + proj(i, "o", att, w.wo, w.bo)
            h = F.rms_norm(x, (self.hidden,), w.w_post, self.eps)
            if self.moe[i] is not None:
                x = x + _run_moe(self.moe[i], h)
                continue
            gate, up = proj(i, "gu", h, w.wgu, w.bgu).chunk(2, -1)
            x = x + proj(i, "d", self.act(gate) * up, w.wd, w.bd)
        last = F.rms_norm(x[:, -1], (self.hidden,), self.final.norm, self.eps)
        return _linear(last, self.final.lm_head, None)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear, or oneDNN's linear on a weight prepacked by `LlamaRunner(prepack=True)`."""
    if w.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    return F.linear(x, w, b)


def prepack_weight(w: torch.Tensor, rows: int) -> torch.Tensor:
    """The weight in oneDNN's blocked layout (what inductor's freezing does, done once, eagerly)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)


def _rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on every head at once (v heads have cos 1, sin 0); the sign of rotate_half is in sin."""
    flipped = qkv.unflatten(-1, (2, qkv.shape[-1] // 2)).flip(-2).flatten(-2)
    return qkv * cos + flipped * sin
