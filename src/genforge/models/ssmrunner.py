"""Batched decoding for state-space LMs (transformers' Mamba2ForCausalLM): a row's whole "cache" is a
fixed-size state, the same at any context length.

Per layer, two tensors hold the state of every row: the causal convolution's last `conv_kernel`
inputs [slots, conv_dim, K] and the SSM state [slots, heads, head_dim, state_size] (float32, as the
model's chunk scan returns it). The model's own forward runs on the batch with a transformers
`DynamicCache` whose per-layer states are these tensors' rows: a decode step gives the mixers views
of rows 0..n-1, which they update in place (`copy_`), so all decoding rows take ONE forward of the
HF model, not one each. Prefill runs the rows of equal chunk length together on their gathered
states and writes them back (no padding: a pad token would shift the convolution's window).

A row's state has no positions, so `move`/`swap` copy the whole state and ignore `length`. A row
that starts (chunk start 0) gets zeroed states: the same as the model's fresh cache (zero
convolution inputs left of the prompt, a zero initial SSM state). Mamba2's chunk scan starts from a
cached state, so chunked prefill is exact; Mamba (1)'s reference scan always starts from zeros, so
`batches_state_space` leaves it to HFRunner.

Same interface as fastdecode.LlamaRunner (extend / prefill / decode / move / swap / release).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

_BATCHED_TYPES = ("mamba2",)


def batches_state_space(model: torch.nn.Module) -> bool:
    """Whether `StateSpaceRunner` runs this model (Mamba2 with its usual module layout)."""
    cfg = getattr(model, "config", None)
    backbone = getattr(model, "backbone", None)
    return (getattr(cfg, "model_type", None) in _BATCHED_TYPES and backbone is not None
            and hasattr(backbone, "layers") and all(hasattr(lay, "mixer") for lay in backbone.layers))


class StateSpaceRunner:
    """Continuous batching over a Mamba2 model's own forward (see the module docstring)."""

    fast_path = False  # not the Llama fast path; `batched` says that its decode step is one forward
    batched = True

    def __init__(self, model: torch.nn.Module, *, max_len: int, slots: int = 4, max_slots: int | None = None):
        if not batches_state_space(model):
            raise ValueError("StateSpaceRunner: not a Mamba2 model")
        cfg = model.config
        self.model = model
        self.max_len = max_len
        self.max_slots = max_slots
        self.vocab_size = cfg.vocab_size
        w = model.get_input_embeddings().weight
        self.dtype, self.device = w.dtype, w.device
        mixer = model.backbone.layers[0].mixer
        self.conv_shape = (mixer.conv_dim, cfg.conv_kernel)
        self.ssm_shape = (mixer.num_heads, mixer.head_dim, mixer.ssm_state_size)
        self.conv: list[torch.Tensor] = []
        self.ssm: list[torch.Tensor] = []
        self._alloc(min(slots, max_slots) if max_slots else slots)

    @torch.inference_mode()
    def _alloc(self, slots: int) -> None:
        """(Re)allocate room for `slots` rows, keeping the rows held so far."""
        old = list(zip(self.conv, self.ssm))
        n = len(self.model.backbone.layers)
        self.conv = [torch.zeros((slots, *self.conv_shape), dtype=self.dtype, device=self.device)
                     for _ in range(n)]
        self.ssm = [torch.zeros((slots, *self.ssm_shape), dtype=torch.float32, device=self.device)
                    for _ in range(n)]
        for (c, s), new_c, new_s in zip(old, self.conv, self.ssm):
            new_c[:c.shape[0]].copy_(c)
            new_s[:s.shape[0]].copy_(s)

    @property
    def slots(self) -> int:
        return self.conv[0].shape[0]

    def _ensure(self, slots: int) -> None:
        if self.max_slots is not None and slots > self.max_slots:
            raise ValueError(f"state cache: {slots} rows exceed the budget's {self.max_slots}")
        if slots > self.slots:
            grown = self.slots
            while grown < slots:
                grown *= 2
            self._alloc(min(grown, self.max_slots) if self.max_slots else grown)

    def _cache(self, conv: list[torch.Tensor], ssm: list[torch.Tensor]) -> DynamicCache:
        """A transformers cache whose layers hold `conv`/`ssm` (views or gathered copies) as a
        cache that has seen a prefix: the mixers read them and update them in place. The layer
        objects are transformers' own LinearAttentionLayer; only their state is set here."""
        cache = DynamicCache(config=self.model.config)
        for layer, c, s in zip(cache.layers, conv, ssm):
            layer.dtype, layer.device = c.dtype, c.device
            layer.conv_states[0], layer.recurrent_states[0] = c, s
            layer.conv_kernel_size[0] = c.shape[-1]
            layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            layer.has_previous_state[0] = True
        return cache

    def _forward(self, ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = self.model(input_ids=ids, cache_params=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    # -- the entry points ----------------------------------------------------------------------
    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        return self.extend(list(range(first_slot, first_slot + len(prompts))), prompts, [0] * len(prompts))

    @torch.inference_mode()
    def extend(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed `chunks[i]` to the row in `slots[i]` (a fresh row when `starts[i]` is 0); logits after
        each chunk's last token. Rows of equal chunk length run as one batch."""
        self._ensure(max(slots) + 1)
        out = torch.empty((len(chunks), self.vocab_size), dtype=torch.float32, device=self.device)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(chunks):
            by_length.setdefault(len(c), []).append(i)
        for group in by_length.values():
            rows = torch.tensor([slots[i] for i in group], device=self.device)
            fresh = torch.tensor([starts[i] == 0 for i in group], device=self.device)[:, None]
            conv = [c[rows].masked_fill_(fresh[..., None], 0) for c in self.conv]
            ssm = [s[rows].masked_fill_(fresh[..., None, None], 0) for s in self.ssm]
            ids = torch.tensor([chunks[i] for i in group], dtype=torch.long, device=self.device)
            out[torch.tensor(group, device=self.device)] = self._forward(ids, self._cache(conv, ssm))
            for dst, src in zip(self.conv + self.ssm, conv + ssm):
                dst.index_copy_(0, rows, src)
        return out

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], *,
               free_slot: int | None = None) -> torch.Tensor:
        """Feed tokens[i] to the row in slot i; next-token logits [n, vocab]. One forward for all rows:
        the cache's states are views of rows 0..n-1, updated in place."""
        n = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        return self._forward(ids, self._cache([c[:n] for c in self.conv], [s[:n] for s in self.ssm]))

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        if src != dst:
            for t in self.conv + self.ssm:
                t[dst].copy_(t[src])

    @torch.inference_mode()
    def swap(self, a: int, b: int, length: int) -> None:
        if a != b:
            for t in self.conv + self.ssm:
                t[[a, b]] = t[[b, a]]

    def release(self, slot: int) -> None:
        """Nothing to free: a row that takes the slot starts from zeroed states."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)
