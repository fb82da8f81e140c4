"""A preallocated KV cache for continuous batching.

Layout: one tensor per layer, [slots, 2 * kv_heads, length, head_dim]: the key heads first, then
the value heads. Keys and values sit side by side because the fused qkv projection already puts
them next to each other, so one decode step writes both with a single indexed copy per layer.

Rows of a running batch always occupy slots 0..n-1 (the batch is kept compact: when a row leaves,
the last row's cache is moved into its slot). The attention of a decode step then reads a plain
slice `cache[:n, :, :max_len]` - a view, no gather copy per layer and step.

Capacity grows on demand (doubling), so a server started with a long context does not allocate
slots x context up front for requests that stay short; it never grows past `max_slots` x
`max_length`, which `fit_kv_budget` chooses at start-up from a byte budget.
"""

from __future__ import annotations

import warnings

import torch

from genforge.common.errors import ConfigError


def kv_bytes_per_position(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of keys and values that one row's one position holds, over all layers."""
    return num_layers * 2 * kv_heads * head_dim * dtype.itemsize


def device_kv_budget(device: torch.device | str, share: float = 0.9) -> int | None:
    """The default budget on an accelerator: `share` of its free memory once the model is loaded
    (None on the CPU, whose cache grows on demand within max_batch_size x max_model_len)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * share)


def fit_kv_budget(per_position: int, max_batch_size: int, max_model_len: int, kv_cache_bytes: int | None, *,
                  source: str | None = None) -> int:
    """The batch size whose full-length KV cache fits `kv_cache_bytes` (None: no budget).

    The context is kept (it is what a request may ask for) and the batch trimmed, with a warning;
    when not even one full-length row fits, a ConfigError names the flags to change. `source`
    says where the budget came from when it was not --kv-cache-memory (e.g. the GPU's free memory).
    """
    if kv_cache_bytes is None:
        return max_batch_size
    budget = source or f"--kv-cache-memory {kv_cache_bytes}"
    per_row = per_position * max_model_len
    fit = kv_cache_bytes // per_row
    if fit < 1:
        fix = "free device memory" if source else f"raise --kv-cache-memory to at least {per_row}"
        shorter = kv_cache_bytes // per_position
        if shorter >= 2:  # a context of one position cannot hold a prompt and a token
            fix += f" or lower --max-model-len to at most {shorter}"
        raise ConfigError(
            f"{budget}: one request of --max-model-len {max_model_len} needs {per_row} bytes of KV cache "
            f"({per_position} per position) but {kv_cache_bytes} are available; {fix}",
            param="kv_cache_bytes")
    if fit < max_batch_size:
        warnings.warn(f"--max-batch-size {max_batch_size} trimmed to {fit}: the KV cache of {fit} rows of "
                      f"{max_model_len} positions fills {budget}", stacklevel=2)
        return int(fit)
    return max_batch_size


class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `length` positions."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, max_length: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", slots: int = 4, length: int = 128,
                 max_slots: int | None = None):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_length = max_length
        self.max_slots = max_slots
        if max_slots is not None:
            slots = min(slots, max_slots)
        self.dtype, self.device = dtype, torch.device(device)
        self.layers: list[torch.Tensor] = []
        self._alloc(slots, min(length, max_length))

    @torch.inference_mode()  # always inference tensors: a compiled step guards on the tensor kind
    def _alloc(self, slots: int, length: int) -> None:
        shape = (slots, 2 * self.kv_heads, length, self.head_dim)
        new = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for old, fresh in zip(self.layers, new):
            s, _, t, _ = old.shape
            fresh[:s, :, :t].copy_(old)
        self.layers = new

    @property
    def slots(self) -> int:
        return self.layers[0].shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].shape[2]

    def ensure(self, slots: int, length: int) -> None:
        """Grow (doubling) so that `slots` rows of `length` positions fit."""
        if length > self.max_length:
            raise ValueError(f"KV cache: {length} positions exceed the maximum {self.max_length}")
        if self.max_slots is not None and slots > self.max_slots:
            raise ValueError(f"KV cache: {slots} rows exceed the budget's {self.max_slots}")
        if slots <= self.slots and length <= self.length:
            return
        new_slots = self.slots
        while new_slots < slots:
            new_slots *= 2
        new_len = self.length
        while new_len < length:
            new_len *= 2
        if self.max_slots is not None:
            new_slots = min(new_slots, self.max_slots)
        self._alloc(new_slots, min(new_len, self.max_length))

    @torch.inference_mode()  # grown inside the runner's inference mode, the tensors are inference tensors
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (batch compaction)."""
        if src == dst or length <= 0:
            return
        for layer in self.layers:
            layer[dst, :, :length].copy_(layer[src, :, :length])

    @torch.inference_mode()
    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of slots `a` and `b`."""
        if a == b or length <= 0:
            return
        for layer in self.layers:
            tmp = layer[a, :, :length].clone()
            layer[a, :, :length].copy_(layer[b, :, :length])
            layer[b, :, :length].copy_(tmp)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
