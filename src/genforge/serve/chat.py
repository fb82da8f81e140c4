"""Turning a chat message list into prompt token ids.

The model's own chat template is used when it carries one (any HF folder with
`chat_template.jinja` or a template in tokenizer_config.json); otherwise genforge's default
template. transformers renders templates in a sandboxed Jinja environment, so a template from
a downloaded model cannot run code on the server.

What a client writes can never become a control token: the template is rendered with a random
placeholder in place of each message's content (and name), the text the template wrote is
tokenized with its special tokens parsed (BOS, `<|im_start|>`, ...), and each client text is
tokenized on its own with special-token parsing off, so a user who types `<|eos|>` or
`<|im_start|>system` gets those characters, not the tokens.
"""

from __future__ import annotations

import re
import secrets
import threading
import weakref
from typing import Any

from genforge.common.errors import GenforgeError
from genforge.models.lm import DEFAULT_CHAT_TEMPLATE
from genforge.serve.protocol import ChatMessage


def resolve_chat_template(tokenizer: Any) -> str:
    """The template this tokenizer will be served with."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own
    if isinstance(own, dict) and own.get("default"):  # named templates: the default one
        return own["default"]
    return DEFAULT_CHAT_TEMPLATE  # one definition, in models.lm (what save_lm writes too)


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
    """Token ids of client texts, special-token strings in them taken as plain text."""
    if not texts:
        return []
    plain = _plain_encoder(tokenizer)
    if plain is not None:
        return [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    with _plain_lock:  # slow tokenizers: the flag is per call, but keep it serial to be safe
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False,
                                                split_special_tokens=True)["input_ids"]]


def render_chat(tokenizer: Any, template: str, messages: list[ChatMessage], *,
                add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt token ids for `messages`; a template error is the client's (a 400 naming messages)."""
    nonce = secrets.token_hex(8)  # unguessable: a client cannot forge a placeholder
    texts: list[str] = []

    def slot(text: str) -> str:
        texts.append(text)
        return f"\ue000{nonce}:{len(texts) - 1}\ue001"

    conversation = [{"role": m.role, "content": slot(m.text()), **({"name": slot(m.name)} if m.name else {})}
                    for m in messages]
    kwargs = dict(template_kwargs or {})
    for reserved in ("conversation", "chat_template", "tokenize", "add_generation_prompt", "tools",
                     "documents", "return_dict", "return_tensors"):
        kwargs.pop(reserved, None)  # the server decides these; a client must not override them
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as e:  # jinja2.TemplateError and raise_exception() in templates
        # Templates reject what the model was not trained on (e.g. roles out of order); that is a
        # fault of the request, and the template's own message says what to change.
        raise GenforgeError(f"messages could not be formatted with the model's chat template: {e}",
                            param="messages") from None
    if not isinstance(text, str):  # some tokenizers return a list for batched input
        text = text[0]
    # The template writes BOS itself where the model wants it; adding special tokens here would
    # double it. Pieces alternate: template text, a client text's index, template text, ...
    pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", text)
    framing, clients = pieces[0::2], [texts[int(i)] for i in pieces[1::2]]
    framing_ids = tokenizer(framing, add_special_tokens=False)["input_ids"]
    client_ids = _encode_plain(tokenizer, clients)
    ids: list[int] = list(framing_ids[0])
    for k, piece in enumerate(client_ids):
        ids += piece
        ids += framing_ids[k + 1]
    return ids
