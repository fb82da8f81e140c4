"""Generation: one request's state, a continuously batched generator, and `generate`.

    SamplingParams        what to sample (models/sampling.py), validated; errors name the field
    TokenEvent            one generated token: its id, new text, logprobs, finish reason
    Sequence              one request: detokenizes incrementally, applies stop strings / stop ids /
                          EOS / length, turns each sampled token into a TokenEvent
    BatchGenerator        rows join (prefill, in chunks for long prompts) and leave between decode
                          steps; one batched decode step for all rows; a finished row frees its
                          cache slot at once; `fast_path` says which runner it uses
    generate(...)         the single-sequence path (eval, the CLI) on the same pieces
    generate_many(...)    many prompts through one BatchGenerator, a waiting prompt taking a row
                          as soon as one finishes (eval suites, the fine-tuning demo)

`serve.engine.Engine` is a scheduler thread around a BatchGenerator.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from genforge.common.errors import ConfigError, GenforgeError
from genforge.models.fastdecode import HFRunner, LlamaRunner, StateSpaceRunner, make_runner
from genforge.models.kvcache import device_kv_budget, fit_kv_budget, kv_bytes_per_position
from genforge.models.lm import context_length, is_state_space
from genforge.models.sampling import BatchSampler, RowSampler, SamplingParams

__all__ = ["SamplingParams", "TokenEvent", "Sequence", "BatchGenerator", "generate", "generate_many",
           "eos_token_ids", "context_length"]


@dataclass
class TokenEvent:
    """One generated token. `text` is the new detokenized text (stop strings removed; may be empty
    while a multi-byte character or a possible stop string is incomplete). `finish_reason` is set
    on the last event of a request: "stop" | "length" | "abort"."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None  # set with finish_reason "abort" when the engine failed


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (which may list several)."""
    ids: set[int] = set()
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src)
    return ids


class Detokenizer:
    """Incremental detokenization that never emits half a UTF-8 character.

    Fast tokenizers use the `tokenizers` DecodeStream (Rust, ~1 us a token), seeded with a clean
    tail of the prompt so decoders that strip a leading space (SentencePiece's "▁") see context.
    Other tokenizers re-decode a short window and hold back text ending in U+FFFD.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = backend if isinstance(backend, Tokenizer) else None
        tail: list[int] = []
        for n in (4, 3, 2, 1):  # a tail that decodes cleanly (no partial character at its end)
            cand = prompt_ids[-n:]
            if len(cand) == n and "\ufffd" not in tokenizer.decode(cand, skip_special_tokens=True):
                tail = list(cand)
                break
        if self.backend is not None:
            self.stream = DecodeStream(ids=tail, skip_special_tokens=True) if tail else DecodeStream(
                skip_special_tokens=True)
        self.ids = tail
        self.prefix_offset, self.read_offset = 0, len(tail)

    def step(self, token_id: int) -> str:
        if self.backend is not None:
            return self.stream.step(self.backend, token_id) or ""
        self.ids.append(token_id)
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = dec(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


class Sequence:
    """One request in flight: its tokens, sampler, detokenizer and stop handling."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, *, eos_ids: set[int],
                 vocab_size: int, max_model_len: int, device: torch.device | str = "cpu"):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sampler = RowSampler(params, self.prompt_ids, vocab_size, eos_ids, device)
        self.detok = Detokenizer(tokenizer, self.prompt_ids)
        self.end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.limit = min(max_model_len, len(self.prompt_ids) + params.max_new_tokens)
        self.pending = ""  # decoded text held back because it could still begin a stop string
        self.finish_reason: str | None = None
        self.prefilled = 0  # prompt tokens in the KV cache (chunked prefill)
        self.adapter: str | None = None  # the LoRA adapter this row runs with (None: the base)
        self.lora_slot = 0  # the runner's slot holding that adapter's weights (0: the base; models/multilora.py)
        self.created = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.tokens)

    def accept(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> TokenEvent:
        """Record a sampled token; the event to send (finish_reason set when this ends it)."""
        self.tokens.append(token)
        self.sampler.observe(token)
        top_text = None if top is None else [(self.tokenizer.decode([t]), lp) for t, lp in top]
        if token in self.end_ids:  # (min_tokens already masked these until reached)
            text, self.pending = self.pending, ""
            self.finish_reason = "stop"
            return TokenEvent(token, text, logprob, top_text, "stop")
        grammar = self.sampler.grammar
        if grammar is not None and (grammar.dead or not grammar.advance(token)):
            self.finish_reason = "abort"
            why = ("allows no token of this model's vocabulary here" if grammar.dead
                   else f"rejected the sampled token ({grammar.error})")
            return TokenEvent(token, "", logprob, top_text, "abort",
                              error=f"structured output failed: the response_format grammar {why}")
        text = self._apply_stop(self.detok.step(token))
        if self.finish_reason is None and grammar is not None and grammar.complete:
            # the JSON is closed: only an end token could follow, so the row ends now, one step early
            text, self.pending = text + self.pending, ""
            self.finish_reason = "stop"
        if self.finish_reason is None and self.length >= self.limit:
            text, self.pending = text + self.pending, ""
            self.finish_reason = "length"
        return TokenEvent(token, text, logprob, top_text, self.finish_reason)

    def _apply_stop(self, new: str) -> str:
        stops = self.params.stop
        if not stops:
            return new
        buf = self.pending + new
        hits = [(i, s) for s in stops if (i := buf.find(s)) >= 0]
        if hits:
            self.finish_reason = "stop"
            self.pending = ""
            return buf[: min(hits)[0]]
        # hold back the longest tail of buf that is a proper prefix of some stop string
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def abort(self) -> TokenEvent:
        self.finish_reason = "abort"
        return TokenEvent(None, "", finish_reason="abort")


class BatchGenerator:
    """Continuous batching over a runner: rows join and leave between decode steps.

    The engine's loop is `add(new_sequences)` when slots are free, then `step()`, each returning
    (Sequence, TokenEvent) pairs. A prompt longer than the prefill budget is prefilled in chunks
    over successive calls (at most `max_prefill_tokens` prompt tokens per add+step round), and
    the row joins the decode batch, with its first token, once its whole prompt is in the cache;
    rows already decoding get a token at every step meanwhile. `rows` holds both kinds.

    Slots: decoding rows own slots 0..d-1 (so a decode step reads a plain slice of the cache),
    rows still prefilling the slots after them. A finished or cancelled row is removed at once and
    the last row of its kind moves into its slot (see models/kvcache.py).

    `kv_cache_bytes` bounds the KV cache: the batch is trimmed to what fits at `max_model_len`
    (with a warning), and a context that does not fit even once is refused (ConfigError). On CUDA
    it defaults to 90% of the free device memory after the model is loaded; on the CPU to none.

    `compile`: False, True (torch.compile the fast path's decode step now: ~10-15 s of CPU here) or
    "background" (compile in a thread while the eager step serves; see LlamaRunner._compile).
    `prepack`: on a CPU, the fast path keeps the weights only in oneDNN's prepacked layout
    (1.2-1.3x bf16, 1.5x fp32 tokens/s here, no compile, one copy); the model's projection weights are
    released, so the model must not run its own forward afterwards (see LlamaRunner).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_batch_size: int = 32,
                 max_model_len: int | None = None, fast: bool | None = None, compile: bool | str = False,
                 max_prefill_tokens: int = 512, kv_cache_bytes: int | None = None, prepack: bool = False,
                 freeze: bool = False):
        if max_prefill_tokens < 1:
            raise ConfigError(f"max_prefill_tokens: must be >= 1, got {max_prefill_tokens}",
                              param="max_prefill_tokens")
        self.model, self.tokenizer = model, tokenizer
        self.max_model_len = context_length(model, max_model_len)
        self.device = next(model.parameters()).device
        cfg = model.config.get_text_config()
        if is_state_space(cfg):
            # no KV cache: a row's state is a few hundred KiB at any length; the batch is not trimmed
            kv_cache_bytes = None
            self.max_batch_size = max_batch_size
        else:
            heads = cfg.num_attention_heads
            per_position = kv_bytes_per_position(
                cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads,
                getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, next(model.parameters()).dtype)
            source = None
            if kv_cache_bytes is None and (kv_cache_bytes := device_kv_budget(self.device)) is not None:
                source = (f"the KV cache budget (90% of the {self.device} device's free memory, "
                          f"{kv_cache_bytes} bytes)")
            self.max_batch_size = fit_kv_budget(per_position, max_batch_size, self.max_model_len,
                                                kv_cache_bytes, source=source)
        self.max_prefill_tokens = max_prefill_tokens
        self.runner: LlamaRunner | StateSpaceRunner | HFRunner = make_runner(
            model, max_len=self.max_model_len, slots=min(self.max_batch_size, 8), fast=fast, compile=compile,
            max_slots=self.max_batch_size if kv_cache_bytes is not None else None, prepack=prepack,
            freeze=freeze)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = self.runner.vocab_size
        self.sampler = BatchSampler()
        self._decoding: list[Sequence] = []
        self._prefilling: list[Sequence] = []
        self._budget = max_prefill_tokens  # prompt tokens left to prefill in this add+step round

    @property
    def fast_path(self) -> bool:
        """Whether the Llama fast path runs this model (dense or MoE; False: the HF forward)."""
        return self.runner.fast_path

    @property
    def batched(self) -> bool:
        """Whether a decode step runs all rows at once (the fast path, or Mamba2's StateSpaceRunner);
        False: HFRunner, one forward per row."""
        return self.runner.fast_path or getattr(self.runner, "batched", False)

    @property
    def rows(self) -> list[Sequence]:
        """Every row holding a slot: decoding rows (slots 0..d-1), then rows still prefilling."""
        return self._decoding + self._prefilling

    @property
    def num_prefilling(self) -> int:
        return len(self._prefilling)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self._decoding) - len(self._prefilling)

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        params.validate(self.max_model_len, len(prompt_ids))
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise GenforgeError(f"prompt: token id {bad[0]!r} is outside the vocabulary (0..{self.vocab_size - 1})",
                                param="prompt")
        return Sequence(prompt_ids, params, self.tokenizer, eos_ids=self.eos_ids, vocab_size=self.vocab_size,
                        max_model_len=self.max_model_len, device=self.device)

    def add(self, seqs: list[Sequence]) -> list[tuple[Sequence, TokenEvent]]:
        """Take new rows and prefill what the round's budget allows; first tokens of rows whose
        prompts are complete (the others follow from later `step()` calls)."""
        if not seqs:
            return []
        if len(seqs) > self.free_slots:
            raise ValueError(f"{len(seqs)} new rows but only {self.free_slots} free slots")
        for s in seqs:
            s.prefilled = 0
        self._prefilling.extend(seqs)
        return self._prefill()

    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        """Prefill chunks within what is left of the round's budget, then one batched decode step
        for every decoding row; each row's events. Ends the round (the budget is renewed)."""
        events = self._prefill() if self._prefilling else []
        self._budget = self.max_prefill_tokens
        if self._decoding:
            rows = list(self._decoding)
            free = len(rows) + len(self._prefilling)
            logits = self.runner.decode([s.tokens[-1] for s in rows], [s.length - 1 for s in rows],
                                        free_slot=free if free < self.max_batch_size else None,
                                        **self._adapters(rows))
            events += self._sample(logits, rows)
        return events

    def _prefill(self) -> list[tuple[Sequence, TokenEvent]]:
        work: list[tuple[Sequence, int]] = []
        for s in sorted(self._prefilling, key=lambda s: s.created):  # first come, first served
            if self._budget <= 0:
                break
            take = min(len(s.prompt_ids) - s.prefilled, self._budget)
            work.append((s, take))
            self._budget -= take
        if not work:
            return []
        first = len(self._decoding)
        logits = self.runner.extend([first + self._prefilling.index(s) for s, _ in work],
                                    [s.prompt_ids[s.prefilled:s.prefilled + k] for s, k in work],
                                    [s.prefilled for s, _ in work], **self._adapters([s for s, _ in work]))
        for s, k in work:  # all counts first: a promotion swaps caches of these lengths
            s.prefilled += k
        done = [i for i, (s, _) in enumerate(work) if s.prefilled == len(s.prompt_ids)]
        for i in done:
            self._promote(work[i][0])
        if not done:
            return []
        return self._sample(logits[torch.tensor(done, device=logits.device)], [work[i][0] for i in done])

    def _adapters(self, rows: list[Sequence]) -> dict:
        """The runner's `adapters` argument: each row's LoRA slot, when adapters are served."""
        return {"adapters": [s.lora_slot for s in rows]} if getattr(self.runner, "lora", None) is not None else {}

    def _promote(self, seq: Sequence) -> None:
        """A fully prefilled row joins the decode batch: it takes the first prefilling slot."""
        d, k = len(self._decoding), self._prefilling.index(seq)
        if k:
            other = self._prefilling[0]
            self.runner.swap(d, d + k, max(seq.prefilled, other.prefilled))
            self._prefilling[0], self._prefilling[k] = seq, other
        self._decoding.append(self._prefilling.pop(0))

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> list[tuple[Sequence, TokenEvent]]:
        tokens, lps, tops = self.sampler(logits, [s.sampler for s in rows])
        out = [(s, s.accept(t, lp, top)) for s, t, lp, top in zip(rows, tokens, lps, tops)]
        for s, ev in out:
            if ev.finish_reason is not None:
                self.remove(s)
        return out

    def remove(self, seq: Sequence) -> None:
        """Free a row's slot now: the last row of its kind moves into it."""
        d = len(self._decoding)
        if seq in self._decoding:
            i, last = self._decoding.index(seq), d - 1
            if i != last:
                mover = self._decoding[last]
                self.runner.move(last, i, mover.length)
                self._decoding[i] = mover
            self._decoding.pop()
            if self._prefilling:  # the last prefilling row fills the hole at the decode batch's end
                mover = self._prefilling.pop()
                self.runner.move(d + len(self._prefilling), last, mover.prefilled)
                self._prefilling.insert(0, mover)
                last = d + len(self._prefilling) - 1
        else:
            k = self._prefilling.index(seq)
            last = d + len(self._prefilling) - 1
            if d + k != last:
                mover = self._prefilling[-1]
                self.runner.move(last, d + k, mover.prefilled)
                self._prefilling[k] = mover
            self._prefilling.pop()
        self.runner.release(last)

    def reset(self) -> None:
        """Drop every row (after a failed step, whose cache state is unknown)."""
        for slot in range(len(self._decoding) + len(self._prefilling)):
            self.runner.release(slot)
        self._decoding.clear()
        self._prefilling.clear()
        self._budget = self.max_prefill_tokens

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """One sequence from prompt to finish (the batch must be otherwise empty)."""
        seq = self.new_sequence(prompt_ids, params)
        events = self.add([seq])
        try:
            while True:
                for s, ev in events:
                    if s is seq:
                        yield ev
                if seq.finished:
                    return
                events = self.step()
        finally:
            if not seq.finished:
                seq.abort()
                self.remove(seq)


def generate(model: torch.nn.Module, tokenizer, prompt_ids: list[int], params: SamplingParams, *,
             max_model_len: int | None = None) -> Iterator[TokenEvent]:
    """Generate for one prompt, yielding a TokenEvent per token (the last has finish_reason).

    Builds a fresh one-row BatchGenerator; to generate many times from one model, keep a
    BatchGenerator and call its `generate`.
    """
    gen = BatchGenerator(model, tokenizer, max_batch_size=1, max_model_len=max_model_len)
    yield from gen.generate(prompt_ids, params)


def generate_many(model: torch.nn.Module, tokenizer, prompts: list[list[int]], params: list[SamplingParams], *,
                  max_batch_size: int = 32, on_finish: Callable[[int], None] | None = None) -> list[str]:
    """The generated text for each prompt (in order), with continuous batching: up to
    `max_batch_size` rows decode together and a waiting prompt joins as soon as a row finishes.
    `on_finish(i)` is called when prompt i is done (a progress bar's hook). Every prompt must
    leave room for one new token in the model's context (BatchGenerator.new_sequence checks)."""
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if not prompts:
        return []
    gen = BatchGenerator(model, tokenizer, max_batch_size=min(max_batch_size, len(prompts)))
    waiting = deque(range(len(prompts)))
    texts = [""] * len(prompts)
    row_of: dict[int, int] = {}  # id(Sequence) -> prompt index (the Sequences stay alive in `seqs`)
    seqs: list[Sequence] = []
    while waiting or gen.rows:
        joining = []
        while waiting and gen.free_slots > len(joining):
            i = waiting.popleft()
            seq = gen.new_sequence(prompts[i], params[i])
            row_of[id(seq)] = i
            seqs.append(seq)
            joining.append(seq)
        for seq, ev in gen.add(joining) + gen.step():
            i = row_of[id(seq)]
            texts[i] += ev.text
            if ev.finish_reason is not None and on_finish is not None:
                on_finish(i)
    return texts
