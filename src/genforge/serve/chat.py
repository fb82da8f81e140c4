"""Turning a chat message list into prompt token ids.

The model's own chat template is used when it carries one (any HF folder with
`chat_template.jinja` or a template in tokenizer_config.json); otherwise genforge's default
template. transformers renders templates in a sandboxed Jinja environment, so a template from
a downloaded model cannot run code on the server.
"""

from __future__ import annotations

from typing import Any

from genforge.common.errors import GenforgeError
from genforge.serve.protocol import ChatMessage

# Used only when neither the model nor models.lm provides a template (models.lm may not be
# importable in a stripped-down install); ChatML, the format most small chat models use.
_FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def resolve_chat_template(tokenizer: Any) -> str:
    """The template this tokenizer will be served with."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own
    if isinstance(own, dict) and own.get("default"):  # named templates: the default one
        return own["default"]
    try:
        from genforge.models.lm import DEFAULT_CHAT_TEMPLATE
    except ImportError:
        return _FALLBACK_TEMPLATE
    return DEFAULT_CHAT_TEMPLATE


def render_chat(tokenizer: Any, template: str, messages: list[ChatMessage], *,
                add_generation_prompt: bool = True, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Prompt token ids for `messages`; a template error is the client's (a 400 naming messages)."""
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
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
    # double it.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
