"""Runners: prefill and ONE batched decode step over a KV cache, for continuous batching.

A runner holds the KV cache of up to N rows in slots 0..n-1 and offers:

    extend(slots, chunks, starts) -> logits after each chunk's last token          [len(chunks), vocab]
                                     (a prompt, or a piece of one: chunked prefill)
    prefill(first_slot, prompts)  -> extend() of whole prompts into first_slot..
    decode(tokens, positions)     -> logits after feeding one token to rows 0..n-1 [n, vocab]
    move(src, dst, length), swap(a, b, length) -> keep the decoding rows in slots 0..n-1
    fast_path                     -> True for LlamaRunner, False for HFRunner

`LlamaRunner` is the fast path for Llama-style models (Llama, Mistral, Qwen2 without sliding window;
Mixtral and Qwen2-MoE): a preallocated cache, rows of similar length prefilled together, and the
transformer of models/llamacore.py (fused weights, one attention call per layer). Prefill and decode
run the same `LlamaCore` (with a query-length axis: L tokens of a chunk, or L = 1); only the decode
step is torch.compiled. On a 2-core CPU the HF forward spends most of a small model's step in Python
and tiny kernels (mask construction, cache bookkeeping, rotary per layer); this path issues about 15
kernels per layer. A mixture-of-experts model's expert dispatch is data-dependent, so its step is
not torch.compiled (eager, prepacked attention).

`StateSpaceRunner` (models/ssmrunner.py) batches Mamba2: its per-row state replaces the KV cache.
`HFRunner` is the fallback for everything else (Mamba, custom attention): the model's own forward
with one transformers `DynamicCache` per row. Correct for any causal LM; slow.

`torch.compile` of the decode step (weights not frozen, so held once): see LlamaRunner._compile.
`prepack=True` (CPU) keeps the weights only in oneDNN's prepacked layout for prefill and decode:
what made inductor's frozen compile fast, without a compile or a second copy (the HF model's
projection weights are released). Engine loop here (16 rows, 64 requests, T 0.7, one thread,
tokens per CPU second; benchmarks/decode_step.py): bf16 2750 -> 3300-3600, fp32 1470 -> 2200-2280;
the frozen compile reached 4100 / 2200 (it also fuses the elementwise ops) with a second copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genforge.models.hfrunner import HFRunner
from genforge.models.kvcache import KVCache
from genforge.models.llamacore import (
    LlamaCore,
    fast_path_unsupported,
    fuse_linears,
    is_gated_mlp,
    prepack_weight,
)
from genforge.models.multilora import MultiLora
from genforge.models.ssmrunner import StateSpaceRunner, batches_state_space

__all__ = ["LlamaRunner", "HFRunner", "StateSpaceRunner", "make_runner", "compile_cache_dir"]


def compile_cache_dir() -> str:
    """Where inductor keeps compiled kernels between runs: $XDG_CACHE_HOME/genforge/inductor
    (~/.cache/genforge/inductor), not the default /tmp/torchinductor_$USER that a reboot clears."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "genforge", "inductor")


def _use_compile_cache() -> None:
    """Point inductor at `compile_cache_dir()` unless a folder is already chosen. torch 2.13 has no
    config field for it: inductor reads TORCHINDUCTOR_CACHE_DIR (and its compile workers inherit
    it), so it is set here, in this process, before the first compile resolves the folder."""
    import os

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        folder = compile_cache_dir()
        os.makedirs(folder, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder





def _buckets(lengths: list[int], waste: float = 0.25) -> list[list[int]]:
    """Indices grouped so that padding each group to its longest adds at most `waste` of its tokens
    (or 8 tokens a row): one long chunk never pads many short ones to its length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g is not None:
            longest, total = lengths[g[0]], sum(lengths[j] for j in g) + lengths[i]
            if longest * (len(g) + 1) <= (1 + waste) * total or longest - lengths[i] <= 8:
                g.append(i)
                continue
        groups.append([i])
    return groups


class LlamaRunner:
    """The fast path for Llama-style models (see the module docstring)."""

    fast_path = True

    def __init__(self, model: torch.nn.Module, *, max_len: int, slots: int = 4,
                 compile: bool | str = False, max_slots: int | None = None, freeze: bool = False,
                 prepack: bool = False):
        """`prepack`: take the model's matrices and keep them only in oneDNN's prepacked layout
        (CPU; no compile needed). The prefill and the decode step then run oneDNN's linear on them:
        the speed of inductor's frozen compile without its start-up or its second copy. The
        model's own projection (and untied lm_head) weights are released: the HF model must not run
        its forward afterwards (its embeddings, norms and config stay)."""
        why = fast_path_unsupported(model, max_len)
        if why:
            raise ValueError(f"fast decode path does not cover this model: {why}")
        if prepack and (compile or model.lm_head.weight.device.type != "cpu"
                        or not torch.backends.mkldnn.is_available()):
            raise ValueError("prepack: CPU with oneDNN only, and not with compile")
        cfg, inner = model.config, model.model
        self.vocab_size = cfg.vocab_size
        self.H = cfg.num_attention_heads
        self.Hkv = cfg.num_key_value_heads or self.H
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.rep = self.H // self.Hkv
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.max_len = max_len
        w = inner.embed_tokens.weight
        self.dtype, self.device = w.dtype, w.device
        self.embed = w.detach()
        self.norm_w = inner.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.layers = []
        self.moe: list[torch.nn.Module | None] = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            gated = is_gated_mlp(m)
            self.moe.append(None if gated else m)
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                *fuse_linears([a.q_proj, a.k_proj, a.v_proj]),
                *fuse_linears([a.o_proj]),
                layer.post_attention_layernorm.weight.detach(),
                *(fuse_linears([m.gate_proj, m.up_proj]) if gated else (None, None)),
                *(fuse_linears([m.down_proj]) if gated else (None, None)),
            ))
        self.prepacked = prepack
        if prepack:
            self._take_andprepack_weight(model, slots)
        gated_mlps = [lay.mlp for lay in inner.layers if is_gated_mlp(lay.mlp)]  # a MoE block brings its own
        self.act = F.silu if cfg.hidden_act == "silu" or not gated_mlps else gated_mlps[0].act_fn
        # RoPE tables for every position, read from the model's own rotary module so scaled
        # variants (llama3, linear, yarn) come out exactly as HF computes them.
        rot = inner.rotary_emb
        t = torch.arange(max_len, dtype=torch.float32, device=self.device)
        freqs = t[:, None] * rot.inv_freq.to(self.device, torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = float(getattr(rot, "attention_scaling", 1.0))
        half = self.D // 2
        self.cos = (emb.cos() * scale).to(self.dtype)
        sin = (emb.sin() * scale).to(self.dtype)
        # rotate_half(x) = cat(-x2, x1) = flip_halves(x) * [-1, +1]: fold the sign into sin.
        sin[:, :half] = -sin[:, :half]
        self.sin = sin
        self.positions = torch.arange(max_len, device=self.device)
        self.cache = KVCache(len(self.layers), self.Hkv, self.D, max_length=max_len, dtype=self.dtype,
                             device=self.device, slots=slots, max_slots=max_slots)

        self.core = LlamaCore(self)
        self.step_fn = self.core
        self.lora: MultiLora | None = None  # adapters served over this base (serve/adapters.py sets it)
        self.compiled = False
        self.freeze = freeze  # see _compile: faster fp32 step, a second copy of the weights
        if compile not in (False, True, "background"):
            raise ValueError(f"compile: expected False, True or 'background', got {compile!r}")
        if compile and any(b is not None for b in self.moe):
            import warnings

            warnings.warn("torch.compile of the decode step: not for mixture-of-experts layers (their expert "
                          "dispatch is data-dependent); running eager", stacklevel=2)
            compile = False
        if compile:
            self._compile(background=compile == "background")

    @torch.no_grad()
    def _take_andprepack_weight(self, model: torch.nn.Module, rows: int) -> None:
        """Prepack the fused matrices (and an untied lm_head); release the model's originals."""
        matrices = (1, 3, 6, 8)  # wqkv, wo, wgu, wd in a layer's tuple (see llamacore.WEIGHT_NAMES)
        self.layers = [tuple(prepack_weight(t, rows) if i in matrices and t is not None else t  # None: a MoE layer
                             for i, t in enumerate(layer)) for layer in self.layers]
        tied = self.lm_head.untyped_storage().data_ptr() == self.embed.untyped_storage().data_ptr()
        if not tied:  # a tied lm_head is the embedding table, which the prefill still reads
            self.lm_head = prepack_weight(self.lm_head, rows)
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            # a MoE block keeps its own weights
            mlp = (m.gate_proj, m.up_proj, m.down_proj) if is_gated_mlp(m) else ()
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, *mlp):
                lin.weight.data = empty  # biases stay: views of the fused biases the runner keeps
        if not tied:
            model.lm_head.weight.data = empty

    def _compile(self, background: bool = False) -> None:
        """torch.compile the decode step; compiled once, dynamic in batch and span.

        Not frozen by default (`freeze=False`), so the compiled step reads the runner's own weights
        and memory holds them once. Measured here (2-core AVX-512 EPYC VM shared with other jobs,
        torch 2.13 CPU, lm-tiny, batch 16, one thread, median CPU time of a step; one run of
        benchmarks/decode_step.py, whose JSON has the rest):

            step (ms)               fp32   bf16
            eager                    9.0    4.5
            compiled                 9.8    4.5   weights once; inductor's FX-graph and AOT caches hit:
                                                  start-up 3 s warm, 17 s cold (CPU, with workers)
            compiled, freeze=True    4.7    4.25  inductor freezing prepacks the weights for oneDNN:
                                                  a second copy of every matrix (+52 MiB RSS fp32
                                                  here), and neither cache takes a frozen graph
                                                  ("mkldnn tensors unpickleable"): 8.5 s warm, 15 s cold

        A second run (benchmarks/results/decode_step.json) gave bf16 eager 5.5, compiled 5.4,
        frozen 3.8 ms: the unfrozen compile does not beat eager in either dtype; the frozen one pays
        (1.4-1.9x), at the price of the second copy. Most of its gain is the prepacked weights,
        which `prepack=True` gives eagerly with one copy and no compile.
        It falls back to eager if the compiler is unavailable. Prefill stays eager (shapes vary too
        much).

        The compiled kernels are kept in a per-user folder (`compile_cache_dir`). `background=True`
        compiles in a thread while the eager step serves: start-up costs eager's time and `decode`
        switches to the compiled step once it is ready (`wait_compiled`); meanwhile the compiling
        thread holds the GIL much of the time and eager steps were ~3x slower here. The warm-up
        calls of the compile write into a scratch cache of their own, never into rows being served.
        """
        cache = KVCache(len(self.layers), self.Hkv, self.D, max_length=self.max_len, dtype=self.dtype,
                        device=self.device, slots=8, length=min(128, self.max_len))
        if background:
            import threading

            self._compile_thread = threading.Thread(target=self._compile_now, args=(cache,), daemon=True,
                                                    name="genforge-compile")
            self._compile_thread.start()
        else:
            self._compile_now(cache)

    def _compile_now(self, scratch: KVCache) -> None:
        try:
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config

            _use_compile_cache()
            fn = torch.compile(self.core, dynamic=True)
            # freezing is read when the graph is compiled (at the first calls, below); as a
            # torch.compile option it did not take effect here. specialize_float: the model's
            # float constants (eps) are not made symbolic, which cost a second trace (~4 s here).
            with torch.inference_mode(), inductor_config.patch(freezing=self.freeze), \
                    dynamo_config.patch(specialize_float=True):
                # compile now, not on the first request; batch and span sizes differ so that no
                # equality between them is baked into the graph
                self._decode_with(fn, [0, 0], [1, 2], cache=scratch)
                self._decode_with(fn, [0, 0, 0], [3, 4, 6], cache=scratch)
        except Exception as e:  # no C++ compiler, unsupported backend: eager still works
            import warnings

            warnings.warn(f"torch.compile of the decode step failed, running eager: {e}", stacklevel=2)
            return
        finally:
            del scratch
        self.step_fn, self.compiled = fn, True  # one attribute read in decode() picks it up

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for a background compile (see `_compile`); whether the compiled step is in use."""
        thread = getattr(self, "_compile_thread", None)
        if thread is not None:
            thread.join(timeout)
        return self.compiled

    def _rope_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin over all q, k and v heads ([..., H + 2Hkv, D]); v heads get cos 1, sin 0."""
        cos, sin = self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)
        shape = (*pos.shape, self.H + self.Hkv, self.D)
        vshape = (*pos.shape, self.Hkv, self.D)
        ones = torch.ones(vshape, dtype=self.dtype, device=self.device)
        cos_all = torch.cat((cos.expand(shape), ones), -2)
        sin_all = torch.cat((sin.expand(shape), torch.zeros_like(ones)), -2)
        return cos_all, sin_all

    # -- the entry points ----------------------------------------------------------------------
    def prefill(self, first_slot: int, prompts: list[list[int]]) -> torch.Tensor:
        """Run whole prompts into slots first_slot.. ; logits of each prompt's last token."""
        return self.extend(list(range(first_slot, first_slot + len(prompts))), prompts, [0] * len(prompts))

    @torch.inference_mode()
    def extend(self, slots: list[int], chunks: list[list[int]], starts: list[int],
               adapters: list[int] | None = None) -> torch.Tensor:
        """Feed `chunks[i]` to the row in `slots[i]`, whose cache holds `starts[i]` positions (chunked
        prefill); logits after each chunk's last token [len(chunks), vocab]. Rows of similar chunk
        length run together, left-padded (pads are neither written to the cache nor attended).
        `adapters[i]`: the LoRA slot of row i (0 or None: the base; see `self.lora`)."""
        self.cache.ensure(max(slots) + 1, max(s + len(c) for s, c in zip(starts, chunks)))
        out = torch.empty((len(chunks), self.vocab_size), dtype=torch.float32, device=self.device)
        for group in _buckets([len(c) for c in chunks]):
            logits = self._extend_group([slots[i] for i in group], [chunks[i] for i in group],
                                        [starts[i] for i in group],
                                        self._lora_arg(None if adapters is None else [adapters[i] for i in group]))
            out[torch.tensor(group, device=self.device)] = logits
        return out

    def _lora_arg(self, adapters: list[int] | None) -> tuple[MultiLora, dict[str, torch.Tensor]] | None:
        """What the core needs to add each row's adapter; None when every row is the base."""
        if self.lora is None or not adapters or not any(adapters):
            return None
        return self.lora, self.lora.rows(torch.tensor(adapters, dtype=torch.long, device=self.device))

    def _extend_group(self, slots: list[int], chunks: list[list[int]], starts: list[int],
                      lora: tuple[MultiLora, dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        n, L = len(chunks), max(len(c) for c in chunks)
        ids, pos, keep, wrows = [], [], [], []
        for i, (slot, c, s) in enumerate(zip(slots, chunks, starts)):
            pad = L - len(c)
            ids += [0] * pad + c
            pos += [s] * pad + list(range(s, s + len(c)))  # a pad sits at the row's first new position
            keep += range(i * L + pad, (i + 1) * L)
            wrows += [slot] * len(c)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev).view(n, L)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev).view(n, L)
        keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
        span = max(s + len(c) for s, c in zip(starts, chunks))
        mask = (self.positions[:span][None, None, :] <= pos_t[:, :, None]).unsqueeze(1)  # [n, 1, L, span]
        if self.rep > 1:
            mask = mask.unsqueeze(2).expand(n, 1, self.rep, L, span).reshape(n, 1, self.rep * L, span)
        contiguous = slots == list(range(slots[0], slots[0] + n))
        read = slice(slots[0], slots[0] + n) if contiguous else torch.tensor(slots, device=dev)
        cos, sin = self._rope_tables(pos_t)
        return self.core(F.embedding(ids_t, self.embed), cos, sin, mask,
                         torch.tensor(wrows, dtype=torch.long, device=dev), pos_t.flatten()[keep_t], keep_t,
                         read, self.cache.layers, lora).float()

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], *, free_slot: int | None = 1,
               adapters: list[int] | None = None) -> torch.Tensor:
        """Feed tokens[i] at positions[i] to the row in slot i (i < len(tokens)); next-token logits.

        `free_slot`: a slot whose cache no row needs (None: none is), used by the compiled step for
        a batch of one. `adapters[i]`: row i's LoRA slot (0 or None: the base); a step with adapter
        rows runs the eager core (the compiled graph was traced without the LoRA delta).
        """
        if (lora := self._lora_arg(adapters)) is not None:
            return self._decode_with(self.core, tokens, positions, lora=lora)
        fn = self.step_fn  # read once: a background compile may swap it in between two steps
        if fn is not self.core and len(tokens) == 1:
            if free_slot is None or (self.cache.max_slots is not None and free_slot >= self.cache.max_slots):
                return self._decode_with(self.core, tokens, positions)
            # a batch of one would make the dynamic-shape compile specialise (and recompile) for
            # size 1; run a throwaway second row that writes into the free slot instead
            return self._decode_with(fn, tokens * 2, positions * 2, scratch=free_slot)[:1]
        return self._decode_with(fn, tokens, positions)

    def _decode_with(self, fn, tokens: list[int], positions: list[int], scratch: int | None = None,
                     cache: KVCache | None = None, lora: tuple[MultiLora, dict[str, torch.Tensor]] | None = None
                     ) -> torch.Tensor:
        n = len(tokens)
        span = max(positions) + 1
        dev = self.device
        cache = self.cache if cache is None else cache
        cache.ensure(max(n, (scratch or 0) + 1), span)
        tok = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        rows = torch.arange(n, device=dev) if scratch is None else torch.tensor([0, scratch], device=dev)
        cos, sin = self._rope_tables(pos[:, None])
        # Each row sees its own prefix only: key t is visible to row i when t <= positions[i].
        mask = (self.positions[:span][None, :] <= pos[:, None]).view(n, 1, 1, span)
        extra = () if lora is None else (lora,)  # the compiled graph's signature stays as it was traced
        return fn(F.embedding(tok, self.embed)[:, None], cos, sin, mask, rows, pos, None, None,
                  cache.layers, *extra).float()

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)

    def swap(self, a: int, b: int, length: int) -> None:
        self.cache.swap(a, b, length)

    def release(self, slot: int) -> None:
        """Nothing to free: the slot's cache is overwritten by the next row that takes it."""


def make_runner(model: torch.nn.Module, *, max_len: int, slots: int = 4, fast: bool | None = None,
                compile: bool | str = False, max_slots: int | None = None,
                freeze: bool = False, prepack: bool = False) -> LlamaRunner | HFRunner:
    """The fast path where it covers the model (or `fast=True` insists), else the HF fallback.
    `prepack` (CPU with oneDNN, fast path only; see LlamaRunner) takes the model's weights."""
    if fast is None and batches_state_space(model):
        return StateSpaceRunner(model, max_len=max_len, slots=slots, max_slots=max_slots)
    if fast is None:
        fast = fast_path_unsupported(model, max_len) is None
    if fast:
        # prepack applies on a CPU with oneDNN (elsewhere the weights stay as they are)
        prepack = prepack and next(model.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available()
        return LlamaRunner(model, max_len=max_len, slots=slots, compile=compile, max_slots=max_slots,
                           freeze=freeze, prepack=prepack)
    return HFRunner(model, max_len=max_len, slots=slots, max_slots=max_slots)
