"""`genforge generate` for LMs: the engine on a terminal, seeds, and flag-naming errors."""

from __future__ import annotations

import io

import pytest

from genforge.cli import main
from genforge.common.errors import GenforgeError
from genforge.jobs.textgen import generate_to_terminal
from genforge.models.lm import save_lm
from tests.conftest import tiny_random_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = tiny_random_llama(64)
    folder = tmp_path_factory.mktemp("lm") / "model"
    save_lm(model, tok, folder)
    return str(folder)


def run(model_dir, **kw):
    buf = io.StringIO()
    args = dict(max_new_tokens=12, temperature=0.9, seed=5)
    texts = generate_to_terminal(model_dir, "the quick", out=buf, **{**args, **kw})
    return texts, buf.getvalue()


def test_same_seed_same_text_and_streams_to_out(model_dir):
    a, printed = run(model_dir)
    b, _ = run(model_dir)
    assert a == b and printed.startswith("the quick") and a[0] in printed
    c, printed = run(model_dir, num_samples=3)
    assert c[0] == a[0] and len(c) == 3 and "--- sample 3 ---" in printed
    assert len(set(c)) > 1  # sample i uses seed + i


@pytest.mark.parametrize("kw, flag", [
    ({"temperature": -0.5}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_k": 0}, "--top-k"),
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"num_samples": 0}, "--num-samples"),
    ({"stop": [""]}, "--stop"),
])
def test_bad_flags_are_named(model_dir, kw, flag):
    with pytest.raises(GenforgeError) as e:
        run(model_dir, **kw)
    assert e.value.message.startswith(f"{flag}:")


def test_prompt_longer_than_context(model_dir, capsys):
    rc = main(["generate", model_dir, "--prompt", "the quick brown fox " * 30])
    assert rc == 2 and "--prompt" in capsys.readouterr().err
