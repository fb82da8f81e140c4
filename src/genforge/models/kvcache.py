"""A preallocated KV cache for continuous batching.

Layout: one tensor per layer, [slots, 2 * kv_heads, length, head_dim]: the key heads first, then
the value heads. Keys and values sit side by side because the fused qkv projection already puts
them next to each other, so one decode step writes both with a single indexed copy per layer.

Rows of a running batch always occupy slots 0..n-1 (the batch is kept compact: when a row leaves,
the last row's cache is moved into its slot). The attention of a decode step then reads a plain
slice `cache[:n, :, :max_len]` - a view, no gather copy per layer and step.

Capacity grows on demand (doubling), so a server started with a long context does not allocate
slots x context up front for requests that stay short.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `length` positions."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, *, max_length: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", slots: int = 4, length: int = 128):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_length = max_length
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
        if slots <= self.slots and length <= self.length:
            return
        new_slots = self.slots
        while new_slots < slots:
            new_slots *= 2
        new_len = self.length
        while new_len < length:
            new_len *= 2
        self._alloc(new_slots, min(new_len, self.max_length))

    @torch.inference_mode()  # grown inside the runner's inference mode, the tensors are inference tensors
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (batch compaction)."""
        if src == dst or length <= 0:
            return
        for layer in self.layers:
            layer[dst, :, :length].copy_(layer[src, :, :length])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)
