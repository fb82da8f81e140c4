"""`--decode`: each mode serves the same greedy text, and the server says what is in effect."""

from __future__ import annotations

import openai
import pytest

from genforge.common.errors import ConfigError

from .conftest import MODEL_NAME, lm_server

PROMPTS = ["The list", "def f(x):\n    return", "Exceptions are"]


def _greedy_texts(lm_run, decode: str) -> tuple[list[str], dict]:
    from genforge.models.lm import load_lm

    # a model of its own: "prepacked" takes the model's projection weights into the runner
    model, tokenizer = load_lm(lm_run)
    with lm_server((model, tokenizer), decode=decode) as live:
        c = openai.OpenAI(base_url=live.v1, api_key="-", max_retries=0, timeout=60)
        texts = [c.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0).choices[0].text
                 for p in PROMPTS]
        return texts, live.app.app.state.service.in_effect()


def test_prepacked_decode_serves_the_eager_text_and_says_so(lm_run) -> None:
    eager, eager_info = _greedy_texts(lm_run, "eager")
    packed, packed_info = _greedy_texts(lm_run, "prepacked")
    assert packed == eager
    assert any(t.strip() for t in eager)
    assert eager_info["decode"] == "eager" and not eager_info["prepacked"] and not eager_info["compiled"]
    assert packed_info["decode"] == "prepacked" and packed_info["prepacked"] and packed_info["fast_path"]
    assert packed_info["dtype"] == "torch.float32" and packed_info["max_batch_size"] >= 1


def test_an_unknown_decode_mode_is_refused(lm) -> None:
    from genforge.serve.server import create_app

    model, tokenizer = lm
    with pytest.raises(ConfigError, match="--decode 'fast'"):
        create_app(model=model, tokenizer=tokenizer, decode="fast")
