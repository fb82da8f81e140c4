"""Turning a chat request's message list into prompt token ids.

The model's own chat template is used when it carries one (any HF folder with
`chat_template.jinja` or a template in tokenizer_config.json); otherwise genforge's default
template (`models.lm.resolve_chat_template`). The rendering itself is `data.chat_template`'s, the
one SFT training uses too, so a fine-tuned model is served the token sequence it was trained on;
there a template error is the request's (a 400 naming `messages`) and a client's text can never
become a control token.
"""

from __future__ import annotations

from typing import Any

from genforge.data.chat_template import render_messages
from genforge.models.lm import resolve_chat_template as resolve_chat_template  # re-exported for serve
from genforge.serve.protocol import ChatMessage


def render_chat(tokenizer: Any, template: str, messages: list[ChatMessage], *,
                add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt token ids for `messages`; a template error is the client's (a 400 naming messages)."""
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in messages]
    return render_messages(tokenizer, template, conversation, add_generation_prompt=add_generation_prompt,
                           template_kwargs=template_kwargs).ids
