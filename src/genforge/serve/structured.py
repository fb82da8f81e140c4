"""Structured outputs: a request's `response_format` -> the grammar that constrains its decoding.

    {"type": "text"}                      free text (no grammar)
    {"type": "json_object"}               any JSON object
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}
                                          JSON that validates against the schema (OpenAI's shape)

Compiling a schema takes milliseconds to seconds, so it runs in a worker thread, never on the
event loop nor on the engine's thread, and compiled grammars are kept by schema (an LRU of
`max_entries`): a judge sending the same schema a thousand times compiles it once. A schema that
cannot be compiled is a 400 naming `response_format`; the failure is remembered too, so a client
retrying a bad schema does not cost a compile each time. The engine only ever sees compiled grammars.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from typing import Any

from genforge.common.errors import GenforgeError
from genforge.models.grammar import Grammar, grammar_tokenizer
from genforge.serve.protocol import ResponseFormat

MAX_SCHEMA_CHARS = 100_000  # a schema's JSON text; bigger ones are refused before any compile


def format_key(fmt: ResponseFormat | None) -> str | None:
    """What identifies the grammar of a response_format (None: free text). The schema's name and
    description do not change the grammar, so they are not part of it."""
    schema = fmt.schema_or_none() if fmt is not None else None
    if schema is None:
        return None
    return json.dumps(schema, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class GrammarCache:
    """Compiled grammars of one model's tokenizer, by schema; see the module docstring."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int], max_entries: int = 128):
        self._hf_tokenizer, self._vocab_size, self._eos_ids = tokenizer, vocab_size, set(eos_ids)
        self._ll_tokenizer: Any = None  # llguidance's tokenizer, built at the first structured request
        self._lock = threading.Lock()  # the entries (taken on the event loop: held for microseconds)
        self._tokenizer_lock = threading.Lock()  # building llguidance's tokenizer (up to ~1 s, in a worker)
        self._entries: collections.OrderedDict[str, Grammar | GenforgeError] = collections.OrderedDict()
        self.max_entries = max_entries
        self.compiles = 0  # compiles run (tests and metrics read it: a cached schema adds none)

    async def get(self, fmt: ResponseFormat | None) -> Grammar | None:
        """The grammar for `fmt` (None for free text); GenforgeError (400, param response_format)."""
        key = format_key(fmt)
        if key is None:
            return None
        if len(key) > MAX_SCHEMA_CHARS:
            raise GenforgeError(f"response_format: the schema is {len(key)} characters; at most "
                                f"{MAX_SCHEMA_CHARS} are accepted", param="response_format")
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
        if found is None:
            found = await asyncio.to_thread(self._compile, key)
        if isinstance(found, GenforgeError):
            raise GenforgeError(found.message, param=found.param, code=found.code)
        return found

    def _compile(self, key: str) -> Grammar | GenforgeError:
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = grammar_tokenizer(self._hf_tokenizer, self._vocab_size, self._eos_ids)
            tokenizer = self._ll_tokenizer
        try:
            out: Grammar | GenforgeError = Grammar.json_schema(json.loads(key), tokenizer)
        except GenforgeError as e:
            out = e
        with self._lock:
            self.compiles += 1
            self._entries[key] = out
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return out
