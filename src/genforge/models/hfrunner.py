"""The fallback runner for any causal LM (custom attention, Mamba): the model's own forward with
one transformers `DynamicCache` per row, one row at a time. Correct for any causal LM; slow. Same
interface as `fastdecode.LlamaRunner` (extend / prefill / decode / move / swap / release).

`DynamicCache(config=...)` builds the right layers for the model: key/value layers for attention,
LinearAttentionLayer (convolution + recurrent state) for Mamba/Mamba2, whose transformers 5 classes
keep their state in it (the separate MambaCache class of transformers 4 is gone). Those models take
it as `cache_params`, not `past_key_values`: passed under the wrong name, it is silently ignored and
every step would see only its own token.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from genforge.models.lm import is_state_space


class HFRunner:
    """Fallback for any causal LM: its own forward, one DynamicCache per row, one row at a time."""

    fast_path = False

    def __init__(self, model: torch.nn.Module, *, max_len: int, slots: int = 4, max_slots: int | None = None):
        self.model = model
        self.max_len = max_len
        self.vocab_size = model.config.get_text_config().vocab_size
        self.device = next(model.parameters()).device
        self.caches: dict[int, DynamicCache] = {}
        self.cache_arg = "cache_params" if is_state_space(model.config) else "past_key_values"

    @torch.inference_mode()
    def _forward(self, ids: list[int], cache: DynamicCache, start: int) -> torch.Tensor:
        if start and len(ids) > 1 and self.model.config.model_type == "mamba":
            # Mamba's reference selective scan starts from a zero state, not the cached one: a
            # prompt continued in chunks goes in one token at a time (the recurrent step reads it)
            for i, t in enumerate(ids[:-1]):
                self._forward([t], cache, start + i)
            return self._forward(ids[-1:], cache, start + len(ids) - 1)
        inp = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        out = self.model(input_ids=inp, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: cache})
        return out.logits[0, -1].float()

    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        return self.extend(list(range(first_slot, first_slot + len(prompts))), prompts, [0] * len(prompts))

    def extend(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        rows = []
        for slot, c, s in zip(slots, chunks, starts):
            if s == 0:
                self.caches[slot] = DynamicCache(config=self.model.config)
            rows.append(self._forward(c, self.caches[slot], s))
        return torch.stack(rows)

    def decode(self, tokens: list[int], positions: list[int], *, free_slot: int | None = None) -> torch.Tensor:
        return torch.stack([self._forward([t], self.caches[i], p)
                            for i, (t, p) in enumerate(zip(tokens, positions))])

    def move(self, src: int, dst: int, length: int) -> None:
        if src != dst:
            self._put(dst, self.caches.pop(src, None))  # none yet: a row not prefilled at all

    def swap(self, a: int, b: int, length: int) -> None:
        ca, cb = self.caches.pop(a, None), self.caches.pop(b, None)
        self._put(a, cb)
        self._put(b, ca)

    def _put(self, slot: int, cache: DynamicCache | None) -> None:
        if cache is None:
            self.caches.pop(slot, None)
        else:
            self.caches[slot] = cache

    def release(self, slot: int) -> None:
        self.caches.pop(slot, None)
