"""Turning a chat message list into token ids: the one renderer that SFT training and `genforge
serve` share, so a fine-tuned model is served with exactly the token sequence it was trained on.

The template is rendered by transformers in a sandboxed Jinja environment (a downloaded model's
template cannot run code). What a user or a dataset row writes can never become a control token:
each message's content (and name) is replaced by a random placeholder while the template renders,
the text the template wrote is tokenized with its special tokens parsed (BOS, `<|im_start|>`, ...),
and each message text is tokenized on its own with special-token parsing off, so a message that
contains `<|eos|>` or `<|im_start|>system` gets those characters, not the tokens.
"""

from __future__ import annotations

import re
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from genforge.common.errors import DataError

# What the caller decides; template kwargs from a request must not override them.
_RESERVED = ("conversation", "chat_template", "tokenize", "add_generation_prompt", "tools", "documents",
             "return_dict", "return_tensors")


@dataclass
class Rendered:
    """Token ids of a rendered conversation, and where each message's content landed in them."""

    ids: list[int]
    content_spans: dict[int, tuple[int, int]]  # message index -> [start, end) of its content tokens


_plain: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_plain_lock = threading.Lock()


def _plain_encoder(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer's backend that never parses special tokens (None for a slow
    tokenizer). A copy, because the flag lives on the backend and the server tokenizes in threads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    with _plain_lock:
        plain = _plain.get(tokenizer)
        if plain is None:
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(backend.to_str())
            plain.encode_special_tokens = True
            plain.no_padding()
            plain.no_truncation()
            _plain[tokenizer] = plain
    return plain


def _encode_plain(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of message texts, special-token strings in them taken as plain text."""
    if not texts:
        return []
    plain = _plain_encoder(tokenizer)
    if plain is not None:
        return [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    with _plain_lock:  # slow tokenizers: the flag is per call, but keep it serial to be safe
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                                split_special_tokens=True)["input_ids"]]


def render_messages(tokenizer: Any, template: str, messages: list[dict], *, add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None = None) -> Rendered:
    """Render `messages` (dicts with role, content and optionally name) with `template`.

    A template that cannot render the conversation raises DataError (param "messages") with the
    template's own message, which usually says what to change (e.g. roles out of order)."""
    nonce = secrets.token_hex(8)  # unguessable: a message cannot forge a placeholder
    texts: list[str] = []
    owner: list[int | None] = []  # slot -> index of the message whose content it holds (None: a name)

    def slot(text: str, message: int | None) -> str:
        texts.append(text)
        owner.append(message)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    conversation = [{"role": m["role"], "content": slot(m["content"], i),
                     **({"name": slot(m["name"], None)} if m.get("name") else {})}
                    for i, m in enumerate(messages)]
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in _RESERVED}
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja2.TemplateError and raise_exception() in templates
        raise DataError(f"messages could not be formatted with the model's chat template: {e}",
                        param="messages") from None
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        text = text[0]
    # The template writes BOS itself where the model wants it; adding special tokens here would
    # double it. Pieces alternate: template text, a slot's index, template text, ...
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    framing, slots = pieces[0::2], [int(i) for i in pieces[1::2]]
    framing_ids = tokenizer(framing, add_special_tokens=False)["input_ids"]
    slot_ids = _encode_plain(tokenizer, [texts[i] for i in slots])
    ids: list[int] = list(framing_ids[0])
    spans: dict[int, tuple[int, int]] = {}
    for k, piece in enumerate(slot_ids):
        if owner[slots[k]] is not None:
            spans[owner[slots[k]]] = (len(ids), len(ids) + len(piece))
        ids += piece
        ids += framing_ids[k + 1]
    return Rendered(ids, spans)
