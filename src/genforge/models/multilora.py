"""Many LoRA adapters over one base in one batch: a per-row LoRA delta for the fast path.

peft merges or wraps one adapter at a time; a server that batches requests for different
adapters needs each row to get its own adapter's update inside the same matmul pass (what
multi-LoRA servers such as vLLM/Punica do). Here the base weights stay fused and untouched; every
adapter that is loaded sits in a slot of stacked tensors, per layer and per fused projection group:

    qkv: A [S, Rq+Rk+Rv, hidden]  B [S, (H + 2Hkv)D, Rq+Rk+Rv]   (B block-diagonal, scale folded in)
    o:   A [S, R, H*D]            B [S, hidden, R]
    gu:  A [S, Rg+Ru, hidden]     B [S, 2*inter, Rg+Ru]
    d:   A [S, R, inter]          B [S, hidden, R]

Slot 0 is all zeros (the base). A step passes each row's slot; the delta of a group is
`bmm(bmm(x, A[ids]^T), B[ids]^T)`, added to the fused projection's output before RoPE / the
activation. Ranks differ between adapters: each group's rank axis is the largest of all adapters
registered, smaller ones are zero-padded.

`read_adapter` checks an adapter folder against the base without loading its weights (config,
tensor names and shapes from the safetensors header), so a server can refuse a bad adapter at
start and load the good ones later, on demand.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from genforge.common.errors import ConfigError, RunError

# projection -> (group, its position within the group's fused output)
_TARGETS = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
            "gate_proj": ("gu", 0), "up_proj": ("gu", 1), "down_proj": ("d", 0)}
_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gu": ("gate_proj", "up_proj"),
           "d": ("down_proj",)}
_KEY = re.compile(r"^base_model\.model\.(model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])\.weight$")
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class AdapterInfo:
    """What an adapter folder holds: checked against the base, weights not read yet."""

    name: str
    path: Path
    base: str | None  # base_model_name_or_path
    ranks: dict[tuple[int, str], int]  # (layer, projection) -> r
    scales: dict[tuple[int, str], float]
    group_rank: dict[str, int] = field(default_factory=dict)  # per group: the sum of its projections' ranks


def _module_dims(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every target projection, by module name ("model.layers.0.self_attn.q_proj")."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in _TARGETS}


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: a key matches a module name's tail."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_adapter(name: str, path: str | Path, model: torch.nn.Module, base_name: str) -> AdapterInfo:
    """Check a peft LoRA folder against the served base (module names and shapes); RunError naming
    the adapter and the base when it does not fit, ConfigError for what the per-row path cannot run."""
    folder = Path(path)
    config_file, weights = folder / "adapter_config.json", folder / WEIGHTS_FILE
    if not config_file.is_file():
        raise RunError(f"adapter {name}: {folder} is not a peft adapter folder (no adapter_config.json)")
    if not weights.is_file():
        raise RunError(f"adapter {name}: {folder} has no {WEIGHTS_FILE} (save it with safe_serialization)")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"adapter {name}: cannot read {config_file}: {e}") from None
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise ConfigError(f"adapter {name}: peft_type {kind} is not served (LoRA only)", param="adapter")
    if cfg.get("use_dora") or cfg.get("modules_to_save") or cfg.get("bias", "none") != "none":
        raise ConfigError(f"adapter {name}: DoRA, modules_to_save and trained biases are not served per row; "
                          f"merge it into the base with `genforge merge` and serve that", param="adapter")
    dims = _module_dims(model)
    ranks: dict[tuple[int, str], int] = {}
    scales: dict[tuple[int, str], float] = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if m is None:
                raise ConfigError(f"adapter {name}: weight {key} is not on a q/k/v/o or gate/up/down projection "
                                  f"of a decoder layer; only those are served per row", param="adapter")
            module, layer, proj, which = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            shape = tuple(f.get_slice(key).get_shape())
            if module not in dims:
                raise RunError(f"adapter {name} ({folder}, trained on {cfg.get('base_model_name_or_path')}) does "
                               f"not fit the base {base_name}: the base has no module {module}")
            fan_in, fan_out = dims[module]
            r = shape[0] if which == "A" else shape[1]
            want = (r, fan_in) if which == "A" else (fan_out, r)
            if shape != want:
                raise RunError(f"adapter {name} ({folder}, trained on {cfg.get('base_model_name_or_path')}) does "
                               f"not fit the base {base_name}: {module}.lora_{which} is {list(shape)}, the base "
                               f"needs {list(want)}")
            ranks[(layer, proj)] = r
    if not ranks:
        raise RunError(f"adapter {name}: {weights} holds no LoRA weights")
    for (layer, proj), r in ranks.items():
        module = f"model.layers.{layer}.{proj}"
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        scales[(layer, proj)] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    info = AdapterInfo(name, folder, cfg.get("base_model_name_or_path"), ranks, scales)
    for group, projs in _GROUPS.items():
        info.group_rank[group] = max((sum(ranks.get((i, p), 0) for p in projs)
                                      for i in {k[0] for k in ranks}), default=0)
    return info


class MultiLora:
    """Stacked slots of adapter weights over a Llama-style base (see the module docstring).

    `slots`: adapters held at once (slot 0, the base, comes on top). `infos`: every adapter that may
    be loaded, to size each group's rank axis. Call `load(slot, info)` to put an adapter's weights
    in a slot (they replace whatever was there) and `clear(slot)` to zero it.

    Per group, A is kept as [S, R, in] and B as [out, S, R], so both are also one plain matrix over
    all slots ([S*R, in], [out, S*R]) without a copy. Two ways to apply them, chosen per group:
    - dense (when S*R is at most half the group's input width): `linear(x, A_all)`, zero the columns
      of other slots with a per-row mask, `linear(., B_all)`. Three ops and two ordinary GEMMs per group:
      the other slots' FLOPs are wasted, but on a CPU the step is bound by the number of ops, and
      the gather + batched-matmul way (below) measured slower at 4 adapters x r 8.
    - gather (many or large adapters): each row's own A and B (index by slot), two batched matmuls.
    """

    def __init__(self, model: torch.nn.Module, infos: list[AdapterInfo], slots: int, *,
                 dtype: torch.dtype, device: torch.device):
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.dtype, self.device = dtype, device
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        self.outs = {"q_proj": attn.q_proj.out_features, "k_proj": attn.k_proj.out_features,
                     "v_proj": attn.v_proj.out_features, "o_proj": attn.o_proj.out_features,
                     "gate_proj": mlp.gate_proj.out_features, "up_proj": mlp.up_proj.out_features,
                     "down_proj": mlp.down_proj.out_features}
        ins = {"qkv": attn.q_proj.in_features, "o": attn.o_proj.in_features, "gu": mlp.gate_proj.in_features,
               "d": mlp.down_proj.in_features}
        self.rank = {g: max((i.group_rank.get(g, 0) for i in infos), default=0) for g in _GROUPS}
        self.groups = [g for g in _GROUPS if self.rank[g]]
        S = self.slots = slots + 1
        self.dense = {g: S * self.rank[g] * 2 <= ins[g] for g in self.groups}
        # which slot each column of the all-slots matrices belongs to (the dense way's row mask)
        self.col_slot = {g: torch.arange(S * self.rank[g], device=device) // self.rank[g] for g in self.groups}
        self.A: list[dict[str, torch.Tensor]] = []
        self.B: list[dict[str, torch.Tensor]] = []
        for _ in range(self.num_layers):
            self.A.append({g: torch.zeros(S, self.rank[g], ins[g], dtype=dtype, device=device) for g in self.groups})
            self.B.append({g: torch.zeros(sum(self.outs[p] for p in _GROUPS[g]), S, self.rank[g], dtype=dtype,
                                          device=device) for g in self.groups})

    def clear(self, slot: int) -> None:
        for layer in range(self.num_layers):
            for g in self.groups:
                self.A[layer][g][slot].zero_()
                self.B[layer][g][:, slot].zero_()

    @torch.no_grad()
    def load(self, slot: int, info: AdapterInfo) -> None:
        """Read an adapter's weights from disk into `slot` (scale folded into B)."""
        if slot < 1:
            raise ValueError("slot 0 is the base and stays zero")
        self.clear(slot)
        with safe_open(str(info.path / WEIGHTS_FILE), "pt", device="cpu") as f:
            tensors = {(int(m.group(2)), m.group(3), m.group(4)): k for k in f.keys() if (m := _KEY.match(k))}
            for layer in range(self.num_layers):
                for g in self.groups:
                    r0, o0 = 0, 0
                    for proj in _GROUPS[g]:
                        out = self.outs[proj]
                        r = info.ranks.get((layer, proj), 0)
                        if r:
                            a = f.get_tensor(tensors[(layer, proj, "A")])
                            b = f.get_tensor(tensors[(layer, proj, "B")]) * info.scales[(layer, proj)]
                            self.A[layer][g][slot, r0:r0 + r] = a.to(self.dtype)
                            self.B[layer][g][o0:o0 + out, slot, r0:r0 + r] = b.to(self.dtype)
                        r0, o0 = r0 + r, o0 + out

    def rows(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per group, what `delta` needs for a batch whose rows use slots `ids` [n]: computed once a
        step, shared by every layer (the dense way's column mask [n, 1, S*R], or the ids themselves)."""
        return {g: (self.col_slot[g][None, None, :] == ids[:, None, None]).to(self.dtype) if self.dense[g] else ids
                for g in self.groups}

    def delta(self, layer: int, group: str, x: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The per-row update of `group`'s fused output for x [n, L, in] (None: no adapter targets it)."""
        if group not in rows:
            return None
        a, b = self.A[layer][group], self.B[layer][group]
        if self.dense[group]:
            return F.linear(F.linear(x, a.view(-1, a.shape[-1])) * rows[group], b.view(b.shape[0], -1))
        ids = rows[group]
        return torch.bmm(torch.bmm(x, a[ids].transpose(1, 2)), b[:, ids].permute(1, 2, 0))
