"""Grammar-constrained decoding: a per-row token mask from a grammar, applied in the decode step.

    tokenizer = grammar_tokenizer(hf_tokenizer, vocab_size, eos_ids)   # once per model (ms to ~1 s)
    grammar = Grammar.json_schema(schema, tokenizer)                    # compile (ms to s): off the engine thread
    SamplingParams(..., grammar=grammar)                                # each row gets grammar.matcher()

Every row with a grammar has its own matcher. In a decode step (either runner: the sampler sees
the logits of both the fast path and the HF path) `grammar_masks` gives the tokens each
constrained row may take next; the sampler sets the others to -inf before temperature, top-k and
top-p, so sampling still applies, renormalised over the allowed tokens. Rows without a grammar in
the same batch are untouched. The matcher advances with each sampled token (Sequence.accept); a
row's end tokens (EOS, stop_token_ids) are allowed only while its grammar accepts, and a row
whose grammar is complete (nothing but an end token could follow) finishes with "stop" at once.

The grammar engine is llguidance (what vLLM, SGLang and llama.cpp use): a Rust parser that
computes a token mask in microseconds for typical JSON schemas, with no Python dependencies.
JSON is generated compact (no free whitespace between tokens): a small model given the choice
spends its tokens on whitespace, and `max_tokens` then cuts the JSON short.
"""

from __future__ import annotations

from typing import Any

import torch

from genforge.common.errors import GenforgeError

__all__ = ["Grammar", "GrammarMatcher", "grammar_tokenizer", "grammar_masks"]

# llguidance's JSON options: compact separators, no whitespace between tokens (see the docstring).
JSON_OPTIONS = {"whitespace_flexible": False}
_BITS = torch.arange(32, dtype=torch.int32)


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
        import llguidance.torch  # noqa: F401
    except ImportError:
        raise GenforgeError("response_format: structured output needs the llguidance package; install the "
                            "serve extra (pip install 'genforge[serve]')", param="response_format") from None
    return llguidance


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer over a model of `vocab_size` logits.

    Costs ~1 s for a 150k vocabulary: build it once per model (serve/structured.py caches it)."""
    llg = _llguidance()
    try:
        return llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)
    except (ValueError, TypeError) as e:
        raise GenforgeError(f"response_format: this model's tokenizer cannot drive a grammar ({e}); structured "
                            f"output needs a Hugging Face fast tokenizer", param="response_format") from None


class Grammar:
    """A compiled grammar over one tokenizer; `matcher()` gives each row its own cheap copy.

    Construction parses the grammar (milliseconds for typical schemas, up to seconds for huge
    ones): do it off the engine thread. A grammar the engine cannot build raises GenforgeError
    (param "response_format") naming what is wrong."""

    def __init__(self, grammar: str, tokenizer: Any, *, source: str = "grammar"):
        llg = _llguidance()
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.vocab_size
        self._template = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self._template.is_error():
            raise GenforgeError(f"response_format: the {source} cannot be compiled: {self._template.get_error()}",
                                param="response_format")
        self._eos = torch.tensor(sorted({t for t in tokenizer.eos_tokens if 0 <= t < self.vocab_size}),
                                 dtype=torch.long)

    @classmethod
    def json_schema(cls, schema: dict, tokenizer: Any) -> Grammar:
        """JSON that validates against `schema` (JSON Schema; llguidance's supported subset)."""
        llg = _llguidance()
        try:
            text = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise GenforgeError(f"response_format: json_schema.schema is not a valid JSON schema: {e}",
                                param="response_format") from None
        return cls(text, tokenizer, source="JSON schema")

    @classmethod
    def json_object(cls, tokenizer: Any) -> Grammar:
        """Any JSON object (OpenAI's {"type": "json_object"})."""
        return cls.json_schema({"type": "object"}, tokenizer)

    def matcher(self, end_ids: set[int] | None = None) -> GrammarMatcher:
        """A fresh matcher at the grammar's start; `end_ids`: the tokens that end this row."""
        return GrammarMatcher(self, self._template.deep_copy(), end_ids or set())


class GrammarMatcher:
    """One row's position in its grammar."""

    def __init__(self, grammar: Grammar, matcher: Any, end_ids: set[int]):
        self.grammar, self._m = grammar, matcher
        self.end_ids = torch.tensor(sorted(t for t in end_ids if t < grammar.vocab_size), dtype=torch.long)
        self.dead = False  # the grammar allowed no token of the vocabulary (see grammar_masks)

    def advance(self, token: int) -> bool:
        """Consume a sampled token; False if the grammar does not allow it (the matcher is then broken)."""
        return bool(self._m.consume_token(token))

    @property
    def accepting(self) -> bool:
        """The text so far is complete: an end token may come now."""
        return self._m.is_accepting()

    @property
    def complete(self) -> bool:
        """Nothing but an end token can follow (e.g. the closing brace of a JSON object)."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def error(self) -> str:
        return self._m.get_error()


def grammar_masks(matchers: list[GrammarMatcher], vocab: int) -> torch.Tensor:
    """The tokens each matcher allows next, as a bool tensor [len(matchers), vocab] (on the CPU).

    End tokens follow the row's own rule (allowed while its grammar accepts), not llguidance's EOS.
    A row left with no allowed token (a grammar the vocabulary cannot spell) is marked `dead` and
    allows every token, so the softmax sees no all -inf row; Sequence.accept then ends it with an error."""
    llg = _llguidance()
    width = matchers[0].grammar.vocab_size  # one tokenizer serves every row of a model
    bitmask = torch.zeros((len(matchers), (width + 31) // 32), dtype=torch.int32)
    for i, m in enumerate(matchers):
        llg.torch.fill_next_token_bitmask(m._m, bitmask, i)
    bits = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(len(matchers), -1)[:, :min(width, vocab)].bool()
    allowed = bits if width >= vocab else torch.cat([bits, bits.new_zeros(len(matchers), vocab - width)], 1)
    for i, m in enumerate(matchers):
        allowed[i, m.grammar._eos[m.grammar._eos < vocab]] = False
        if m.end_ids.numel() and m.accepting:
            allowed[i, m.end_ids[m.end_ids < vocab]] = True
        if not bool(allowed[i].any()):
            m.dead = True  # Sequence.accept ends the row with an error, whatever is sampled
            allowed[i] = True
    return allowed
