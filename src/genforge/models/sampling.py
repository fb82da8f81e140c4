"""Sampling parameters, their valid ranges, and the batched sampler of a decode step.

The sampler works on the whole batch at once (one softmax, one cumulative sum, one
`searchsorted` for all rows) and still gives every row its own random stream: a row's uniform
numbers are a counter-based hash of (its seed, how many tokens it has drawn, the attempt), computed
from Python integers, so they depend only on that row, never on which other requests share the
batch, nor on the device. The same seed gives the same text alone or in company (up to float
rounding differences of batched matmuls, which on this CPU did not show in tests).

Sampling is by inverse CDF over the (temperature-scaled, top-k-cut) distribution; top-p is exact
by rejection: a drawn token outside the nucleus is drawn again from the same distribution, which
yields the nucleus's renormalised distribution (rows still outside after a few attempts, which
only a tiny top_p makes likely, fall back to a sort).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from genforge.common.errors import GenforgeError

MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20; vLLM uses the same bound for `logprobs`


@dataclass(frozen=True)
class Range:
    """A numeric range in pydantic's terms: `Field(**r.field_kwargs())` gives the same bounds."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    note: str = ""

    def field_kwargs(self) -> dict[str, float]:
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le)) if v is not None}

    def contains(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le))

    def describe(self) -> str:
        lo = f"[{_num(self.ge)}" if self.ge is not None else (f"({_num(self.gt)}" if self.gt is not None else "")
        if lo and self.le is not None:
            text = f"in {lo}, {_num(self.le)}]"
        elif self.ge is not None:
            text = f">= {_num(self.ge)}"
        elif self.gt is not None:
            text = f"> {_num(self.gt)}"
        else:
            text = f"<= {_num(self.le)}"
        return f"must be {text}{f' ({self.note})' if self.note else ''}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# The valid values of each sampling field, keyed by the OpenAI request field. serve/protocol.py
# builds its pydantic bounds from these, so the HTTP layer and the model layer cannot disagree.
SAMPLING_RANGES: dict[str, Range] = {
    "max_tokens": Range(ge=1),
    "temperature": Range(ge=0.0, note="0 = greedy"),
    "top_k": Range(ge=-1, note="-1 / 0 for no limit"),
    "top_p": Range(gt=0.0, le=1.0),
    "repetition_penalty": Range(gt=0.0, note="1 = off"),
    "presence_penalty": Range(ge=-2.0, le=2.0),
    "frequency_penalty": Range(ge=-2.0, le=2.0),
    "min_tokens": Range(ge=0),
    "seed": Range(ge=-(2 ** 63), le=2 ** 64 - 1),  # any 64-bit integer, signed or unsigned
    "logprobs": Range(ge=0, le=MAX_LOGPROBS),
}


def check_prompt_length(prompt_len: int, max_new_tokens: int | None, max_model_len: int, *,
                        prompt_field: str = "prompt", tokens_field: str = "max_tokens") -> int:
    """The number of tokens to generate; GenforgeError (code context_length_exceeded) if none fit.

    `max_new_tokens=None` means "the rest of the context". The error names `prompt_field` or
    `tokens_field` (the request's own field names, e.g. "messages" / "max_completion_tokens").
    """
    if prompt_len < 1:
        raise GenforgeError(f"{prompt_field}: the prompt is empty; give at least one token", param=prompt_field)
    if prompt_len >= max_model_len:
        raise GenforgeError(f"{prompt_field}: the prompt has {prompt_len} tokens but the model's context is "
                            f"{max_model_len}; shorten it to at most {max_model_len - 1} tokens",
                            param=prompt_field, code="context_length_exceeded")
    if max_new_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_new_tokens > max_model_len:
        raise GenforgeError(f"{tokens_field}: {max_new_tokens} new tokens do not fit: the context is "
                            f"{max_model_len} tokens and the prompt uses {prompt_len}; ask for at most "
                            f"{max_model_len - prompt_len}", param=tokens_field, code="context_length_exceeded")
    return max_new_tokens


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
    # models.grammar.Grammar: only tokens it allows are sampled (structured output); None = free text
    grammar: Any = None
    # models.watermark.TextWatermark: green tokens of its key get its logit bonus; None = no watermark
    watermark: Any = None

    @property
    def greedy(self) -> bool:
        # below ~1e-5 logits / temperature overflows; such a temperature is greedy anyway
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, max_model_len: int | None = None, prompt_len: int | None = None) -> SamplingParams:
        """Raise GenforgeError(param=<OpenAI field>) for a value no request may have; return self.

        With `max_model_len` and `prompt_len`, the prompt must leave room for one token; a longer
        `max_new_tokens` is cut to the context (the request finishes with "length").
        """

        def bad(param: str, msg: str) -> GenforgeError:
            return GenforgeError(f"{param}: {msg}", param=param)

        def num(name: str, value: object, integer: bool = False) -> None:
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or (
                    isinstance(value, float) and not math.isfinite(value)):
                raise bad(name, f"expected a {'integer' if integer else 'number'}, got {value!r}")
            if not SAMPLING_RANGES[name].contains(value):
                raise bad(name, f"{SAMPLING_RANGES[name].describe()}, got {value}")

        num("max_tokens", self.max_new_tokens, integer=True)
        num("temperature", self.temperature)
        if self.top_k is not None:
            num("top_k", self.top_k, integer=True)
        num("top_p", self.top_p)
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            num(name, getattr(self, name))
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "expected a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "expected a list of token ids (integers >= 0)")
        num("min_tokens", self.min_tokens, integer=True)
        if self.min_tokens > self.max_new_tokens:
            raise bad("min_tokens", f"must be in [0, max_tokens={self.max_new_tokens}], got {self.min_tokens}")
        if self.seed is not None:
            num("seed", self.seed, integer=True)
        if self.logprobs is not None:
            num("logprobs", self.logprobs, integer=True)
        if max_model_len is not None and prompt_len is not None:
            check_prompt_length(prompt_len, None, max_model_len)
        return self


_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform(seed: int, draw: int, attempt: int = 0) -> float:
    """A uniform number in (0, 1) that is a pure function of (seed, draw, attempt)."""
    z = _splitmix64((seed & _M64) ^ _splitmix64((draw << 8) | (attempt & 0xFF)))
    return ((z >> 11) + 0.5) * 2.0 ** -53


class RowSampler:
    """One row's sampling state: its seed and draw count and, when penalties are on, token counts."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int,
                 eos_ids: set[int], device: torch.device | str = "cpu"):
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.draws = 0  # random draws so far: the counter of this row's random stream
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        if params.needs_penalties:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = torch.tensor([t for t in prompt_ids if t < vocab_size], dtype=torch.long, device=device)
            self.seen[ids] = True
        banned = set(params.stop_token_ids) | (eos_ids if not params.ignore_eos else set())
        # structured output: this row's position in its grammar (models/grammar.py); the tokens
        # that end the row are allowed only where the grammar accepts
        self.grammar = params.grammar.matcher(banned) if params.grammar is not None else None
        # min_tokens: until reached, the tokens that would end the request are masked.
        self.min_tokens_ban = torch.tensor(sorted(t for t in banned if t < vocab_size), dtype=torch.long,
                                           device=device)
        self.generated = 0
        # the watermark's green list after each token depends on the token before it: the prompt's
        # last at first (a row always has a prompt token), then each sampled one
        self.watermark = params.watermark
        self.prev = prompt_ids[-1] if prompt_ids else 0

    def observe(self, token: int) -> None:
        self.generated += 1
        self.prev = token
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True

    @property
    def plain(self) -> bool:
        """No penalty, no min_tokens mask and no grammar applies to the next token."""
        return self.counts is None and self.generated >= self.params.min_tokens and self.grammar is None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and min_tokens masking on one row's logits (in place)."""
        p = self.params
        if self.counts is not None:
            if p.repetition_penalty != 1.0:  # HF/CTRL style, over prompt and output
                sel = logits[self.seen]
                logits[self.seen] = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
            if p.frequency_penalty or p.presence_penalty:  # OpenAI style, over the output only
                logits -= self.counts * p.frequency_penalty + (self.counts > 0).float() * p.presence_penalty
            # an extreme penalty (repetition_penalty 5e-324 is valid) overflows to +inf, and one
            # +inf logit turns the softmax into NaNs; 1e30 stays finite through any temperature
            torch.nan_to_num_(logits, nan=float("-inf"), posinf=1e30)
        if self.generated < p.min_tokens and self.min_tokens_ban.numel():
            logits[self.min_tokens_ban] = float("-inf")
        return logits


@dataclass
class _BatchParams:
    """The per-row parameters of one batch composition as tensors on the logits' device."""

    rows: list[RowSampler]
    greedy: torch.Tensor  # [n] bool
    all_greedy: bool
    any_greedy: bool
    temps: torch.Tensor  # [n, 1]
    kth: torch.Tensor | None  # [n, 1] index of each row's k-th largest logit among the top kmax
    no_k: torch.Tensor | None  # [n, 1] rows without a top-k cut
    kmax: int
    top_p: torch.Tensor | None  # [n], inf for rows that do not cut (None when no row cuts)
    want_lp: list[int]  # rows that asked for logprobs
    top_n: int  # the most top logprobs any row asked for
    marked: list[int]  # rows sampled with a watermark
    marks: list[Any]  # their models.watermark.TextWatermark


_TOP_P_ATTEMPTS = 16


class BatchSampler:
    """Samples a batch's next tokens; caches the parameter tensors while the batch is unchanged."""

    def __init__(self) -> None:
        self._cached: _BatchParams | None = None

    def _params(self, rows: list[RowSampler], vocab: int, device: torch.device) -> _BatchParams:
        c = self._cached
        if c is not None and len(c.rows) == len(rows) and all(a is b for a, b in zip(c.rows, rows)):
            return c
        ps = [r.params for r in rows]
        greedy = [p.greedy for p in ps]
        ks = [p.top_k if p.top_k and 0 < p.top_k < vocab else vocab for p in ps]
        kmax = max((k for k in ks if k < vocab), default=0)
        tps = [p.top_p for p in ps]
        want_lp = [i for i, p in enumerate(ps) if p.logprobs is not None]
        marked = [i for i, p in enumerate(ps) if p.watermark is not None]
        c = self._cached = _BatchParams(
            rows=list(rows),
            greedy=torch.tensor(greedy, device=device),
            all_greedy=all(greedy), any_greedy=any(greedy),
            temps=torch.tensor([1.0 if g else p.temperature for p, g in zip(ps, greedy)],
                               device=device)[:, None],
            kth=torch.tensor([min(k, kmax) - 1 for k in ks], device=device)[:, None] if kmax else None,
            no_k=torch.tensor([k >= vocab for k in ks], device=device)[:, None] if kmax else None,
            kmax=kmax,
            top_p=torch.tensor([t if t < 1 else float("inf") for t in tps], device=device) if min(tps) < 1 else None,
            want_lp=want_lp, top_n=max((ps[i].logprobs or 0 for i in want_lp), default=0),
            marked=marked, marks=[ps[i].watermark for i in marked])
        return c

    def __call__(self, logits: torch.Tensor, rows: list[RowSampler]
                 ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
        """Pick one token per row of `logits` [n, vocab] (float32) with each row's own params.

        Returns the tokens, the chosen tokens' logprobs and the top logprobs (token id, logprob)
        for rows that asked for them (None otherwise). Logprobs are those of the model's
        distribution (before penalties and temperature), as vLLM reports them by default.
        """
        n, vocab = logits.shape
        bp = self._params(rows, vocab, logits.device)
        raw_lp = torch.log_softmax(logits, -1) if bp.want_lp else None
        special = [i for i, r in enumerate(rows) if not r.plain]
        if special:
            logits = logits.clone()
            for i in special:
                rows[i].process(logits[i])
            constrained = [i for i in special if rows[i].grammar is not None]
            if constrained:  # structured output: each such row keeps only what its grammar allows
                from genforge.models.grammar import grammar_masks

                allowed = grammar_masks([rows[i].grammar for i in constrained], vocab).to(logits.device)
                if len(constrained) == n:
                    logits.masked_fill_(~allowed, float("-inf"))
                else:
                    idx = torch.tensor(constrained, device=logits.device)
                    logits[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
        if bp.marked:  # after penalties and grammar, before temperature; greedy rows take it too
            from genforge.models.watermark import add_green_bias

            logits = logits if special else logits.clone()
            add_green_bias(logits, bp.marked, bp.marks, [rows[i].prev for i in bp.marked])
        if bp.all_greedy:
            picks = logits.argmax(-1)
        else:
            picks = self._sample(logits, bp)
            if bp.any_greedy:
                picks = torch.where(bp.greedy, logits.argmax(-1), picks)
            for r in rows:
                r.draws += 1
        tokens = picks.tolist()
        chosen: list[float | None] = [None] * n
        tops: list[list[tuple[int, float]] | None] = [None] * n
        if raw_lp is not None:
            sel = torch.tensor(bp.want_lp, device=logits.device)
            lp = raw_lp[sel]
            chosen_lp = lp.gather(1, picks[sel][:, None])[:, 0].tolist()
            top_vals, top_ids = lp.topk(bp.top_n, -1) if bp.top_n else (None, None)
            top_vals = top_vals.tolist() if top_vals is not None else None
            top_ids = top_ids.tolist() if top_ids is not None else None
            for j, i in enumerate(bp.want_lp):
                chosen[i] = chosen_lp[j]
                k = rows[i].params.logprobs or 0
                tops[i] = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
        return tokens, chosen, tops

    def _sample(self, logits: torch.Tensor, bp: _BatchParams) -> torch.Tensor:
        x = logits / bp.temps
        if bp.kmax:
            kth = x.topk(bp.kmax, -1).values.gather(1, bp.kth).masked_fill_(bp.no_k, float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, -1)
        cdf = probs.cumsum(-1)
        rows = bp.rows
        picks = self._invert(cdf, [uniform(r.seed, r.draws) for r in rows])
        if bp.top_p is None:
            return picks
        # a token is in the nucleus when the tokens likelier than it hold less than top_p; rows
        # that do not cut have top_p = inf. (p - p_t).sign().clamp(min=0) is the 0/1 mask "p > p_t",
        # 2-5x cheaper here than a bool compare and select.
        p, top_p, pending, tries = probs, bp.top_p, None, picks
        for attempt in range(1, _TOP_P_ATTEMPTS + 1):
            above = ((p - p.gather(1, tries[:, None])).sign_().clamp_(min=0) * p).sum(-1)
            outside = above >= top_p
            if not bool(outside.any()):
                return picks
            pending = outside.nonzero()[:, 0] if pending is None else pending[outside]
            idx = pending.tolist()
            p, top_p = probs[pending], bp.top_p[pending]
            if attempt == _TOP_P_ATTEMPTS:
                break
            tries = self._invert(cdf[pending], [uniform(rows[i].seed, rows[i].draws, attempt) for i in idx])
            picks[pending] = tries
        # rare (a tiny top_p over a flat distribution): the nucleus by sorting these rows
        p = probs[pending]
        sorted_p, order = p.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
        # the likeliest token is always in the nucleus: a top_p below float32's smallest number (the
        # API takes any float > 0, e.g. 5e-324) is 0 here and would otherwise drop every token
        drop[:, 0] = False
        p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        picks[pending] = self._invert(p.cumsum(-1), [uniform(rows[i].seed, rows[i].draws, 255) for i in idx])
        return picks

    @staticmethod
    def _invert(cdf: torch.Tensor, us: list[float]) -> torch.Tensor:
        """The token whose CDF interval holds u * total, for each row (never a zero-probability one)."""
        total = cdf[:, -1:]
        u = torch.tensor(us, dtype=cdf.dtype, device=cdf.device)[:, None] * total
        # u * total may round up to total, past the last token with non-zero probability
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True)[:, 0]


def sample(logits: torch.Tensor, rows: list[RowSampler]
           ) -> tuple[list[int], list[float | None], list[list[tuple[int, float]] | None]]:
    """One-off `BatchSampler()(logits, rows)`; a decode loop keeps a BatchSampler instead."""
    return BatchSampler()(logits, rows)
