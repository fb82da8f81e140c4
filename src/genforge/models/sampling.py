"""Sampling parameters and the per-row sampler of a batched decode step.

Every row of a batch carries its own `SamplingParams` and its own `torch.Generator`: the random
numbers a row draws depend only on its seed and how many tokens it has drawn, never on which
other requests share the batch, so the same seed gives the same text alone or in company
(up to float rounding differences of batched matmuls, which on this CPU did not show in tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from genforge.common.errors import GenforgeError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Field errors name the OpenAI request field."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs to return; 0 = only the chosen token's

    @property
    def greedy(self) -> bool:
        # below ~1e-5 logits / temperature overflows; such a temperature is greedy anyway
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, max_model_len: int | None = None, prompt_len: int | None = None) -> SamplingParams:
        """Raise GenforgeError(param=<OpenAI field>) for a value no request may have; return self."""

        def bad(param: str, msg: str) -> GenforgeError:
            return GenforgeError(f"{param}: {msg}", param=param)

        def num(name: str, value: object, kinds: tuple = (int, float)) -> None:
            if isinstance(value, bool) or not isinstance(value, kinds) or (
                    isinstance(value, float) and not math.isfinite(value)):
                raise bad(name, f"expected a {'integer' if kinds == (int,) else 'number'}, got {value!r}")

        num("max_tokens", self.max_new_tokens, (int,))
        if self.max_new_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_new_tokens}")
        num("temperature", self.temperature)
        if self.temperature < 0:
            raise bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None:
            num("top_k", self.top_k, (int,))
            if self.top_k < -1:  # -1 and 0: no limit, as in vLLM
                raise bad("top_k", f"must be >= 1 (or -1 / 0 for no limit), got {self.top_k}")
        num("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        num("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            num(name, value)
            if not -2 <= value <= 2:
                raise bad(name, f"must be in [-2, 2], got {value}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "expected a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "expected a list of token ids (integers >= 0)")
        num("min_tokens", self.min_tokens, (int,))
        if self.min_tokens < 0 or self.min_tokens > self.max_new_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_new_tokens}], got {self.min_tokens}")
        if self.seed is not None:
            num("seed", self.seed, (int,))
        if self.logprobs is not None:
            num("logprobs", self.logprobs, (int,))
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if max_model_len is not None and prompt_len is not None:
            if prompt_len < 1:
                raise bad("prompt", "the prompt is empty; give at least one token")
            if prompt_len >= max_model_len:
                raise bad("prompt", f"the prompt has {prompt_len} tokens but the model's context is "
                                    f"{max_model_len}; shorten it to at most {max_model_len - 1} tokens")
        return self


class RowSampler:
    """Per-row sampling state: the generator and, when penalties are on, token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 eos_ids: set[int], device: torch.device | str = "cpu"):
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if params.needs_penalties:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in prompt_ids if t < vocab_size], dtype=torch.long)
            self.seen[ids] = True
        banned = set(params.stop_token_ids) | (eos_ids if not params.ignore_eos else set())
        # min_tokens: until reached, the tokens that would end the request are masked.
        self.min_tokens_ban = torch.tensor(sorted(t for t in banned if t < vocab_size), dtype=torch.long)
        self.generated = 0

    def observe(self, token: int) -> None:
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and min_tokens masking on one row's logits (in place)."""
        p = self.params
        if self.counts is not None:
            if p.repetition_penalty != 1.0:  # HF/CTRL style, over prompt and output
                sel = logits[self.seen]
                logits[self.seen] = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
            if p.frequency_penalty or p.presence_penalty:  # OpenAI style, over the output only
                logits -= self.counts * p.frequency_penalty + (self.counts > 0).float() * p.presence_penalty
        if self.generated < p.min_tokens and self.min_tokens_ban.numel():
            logits[self.min_tokens_ban] = float("-inf")
        return logits


def sample(logits: torch.Tensor, rows: list[RowSampler]
           ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """Pick one token per row of `logits` [n, vocab] with each row's own params.

    Returns the tokens, the chosen tokens' logprobs and the top logprobs (token id, logprob) for
    rows that asked for them (None otherwise). Logprobs are those of the model's distribution
    (before penalties and temperature), as vLLM reports them by default.
    """
    n = logits.shape[0]
    want_lp = [r.params.logprobs is not None for r in rows]
    raw_lp = torch.log_softmax(logits, -1) if any(want_lp) else None
    plain = all(r.counts is None and r.generated >= r.params.min_tokens for r in rows)
    if not plain:
        logits = logits.clone()
        for i, r in enumerate(rows):
            r.process(logits[i])
    greedy = [r.params.greedy for r in rows]
    if all(greedy):
        tokens = logits.argmax(-1).tolist()
    else:
        tokens = _sample_rows(logits, rows, greedy)
    chosen_lp: list[float | None] = [None] * n
    tops: list[list[tuple[int, float]] | None] = [None] * n
    if raw_lp is not None:
        for i, r in enumerate(rows):
            if not want_lp[i]:
                continue
            chosen_lp[i] = float(raw_lp[i, tokens[i]])
            if r.params.logprobs:
                vals, idx = raw_lp[i].topk(r.params.logprobs)
                tops[i] = list(zip(idx.tolist(), vals.tolist()))
            else:
                tops[i] = []
    return tokens, chosen_lp, tops


def _sample_rows(logits: torch.Tensor, rows: list[RowSampler], greedy: list[bool]) -> list[int]:
    n, vocab = logits.shape
    temps = torch.tensor([r.params.temperature if not g else 1.0 for r, g in zip(rows, greedy)])
    x = logits / temps[:, None]
    ks = [r.params.top_k if r.params.top_k and 0 < r.params.top_k < vocab else vocab for r in rows]
    if min(ks) < vocab:
        top_vals = x.topk(max(k for k in ks if k < vocab), -1).values
        kth = torch.tensor([top_vals[i, k - 1] if k < vocab else float("-inf") for i, k in enumerate(ks)])
        x = x.masked_fill(x < kth[:, None], float("-inf"))
    tps = torch.tensor([r.params.top_p for r in rows])
    probs = torch.softmax(x, -1)
    if (tps < 1).any():
        sorted_p, order = probs.sort(-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p; the top one always stays
        drop = (sorted_p.cumsum(-1) - sorted_p) >= tps[:, None]
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # Exponential race (Gumbel-max in another form): argmax(p / E), E ~ Exp(1), drawn from the
    # row's own generator - one draw of `vocab` numbers per token whatever the batch holds.
    noise = torch.ones_like(probs)
    for i, r in enumerate(rows):
        if not greedy[i]:
            noise[i].exponential_(generator=r.generator)
    picks = (probs / noise).argmax(-1)
    if any(greedy):
        picks = torch.where(torch.tensor(greedy), logits.argmax(-1), picks)
    return picks.tolist()
