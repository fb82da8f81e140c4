"""Grammar-constrained decoding (models/grammar.py) in the batched decode step, on both runners."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from genforge.common.errors import GenforgeError
from genforge.models.generation import BatchGenerator, Sequence
from genforge.models.grammar import Grammar, grammar_masks, grammar_tokenizer
from genforge.models.sampling import SamplingParams
from tests.models.test_generation import llama_config, tiny_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
          "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                         "reason": {"type": "string", "maxLength": 16}}}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(len(tok))).eval()


@pytest.fixture(scope="module")
def lltok(tok, model):
    return grammar_tokenizer(tok, model.config.vocab_size, {0})


def check_verdict(text: str) -> None:
    """The SCHEMA, checked by hand: exactly the two fields, in range."""
    obj = json.loads(text)
    assert set(obj) == {"score", "reason"}, text
    assert isinstance(obj["score"], int) and 1 <= obj["score"] <= 10, text
    assert isinstance(obj["reason"], str) and len(obj["reason"]) <= 16, text


def run_all(gen: BatchGenerator, seqs: list[Sequence]) -> dict[Sequence, list]:
    events: dict[Sequence, list] = {s: [] for s in seqs}
    pending = gen.add(seqs)
    while True:
        for s, ev in pending:
            events[s].append(ev)
        if all(s.finished for s in seqs):
            return events
        pending = gen.step()


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "hf-path"])
def test_constrained_rows_follow_the_schema_and_free_rows_do_not_change(model, tok, lltok, fast):
    grammar = Grammar.json_schema(SCHEMA, lltok)
    gen = BatchGenerator(model, tok, max_batch_size=4, fast=fast)
    assert gen.fast_path is fast
    prompt = tok.encode("the quick brown fox")
    free = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    constrained = [SamplingParams(max_new_tokens=100, temperature=1.0, seed=1, grammar=grammar),
                   SamplingParams(max_new_tokens=100, temperature=0.7, top_p=0.9, top_k=50, seed=2, grammar=grammar),
                   SamplingParams(max_new_tokens=100, temperature=0, grammar=grammar)]
    seqs = [gen.new_sequence(prompt, p) for p in [free, *constrained]]
    events = run_all(gen, seqs)
    for s in seqs[1:]:
        text = "".join(e.text for e in events[s])
        assert s.finish_reason == "stop", text
        check_verdict(text)
        assert s.tokens[-1] not in s.end_ids  # ended by the closed object, not by an EOS it was allowed
    alone = [e.token_id for e in gen.generate(prompt, free)]
    assert [e.token_id for e in events[seqs[0]]] == alone
    # the same seed and grammar give the same JSON again; another seed (almost surely) another one
    again = "".join(e.text for e in gen.generate(prompt, constrained[0]))
    assert again == "".join(e.text for e in events[seqs[1]])


def test_length_before_the_json_closes_finishes_with_length(model, tok, lltok):
    gen = BatchGenerator(model, tok, max_batch_size=2)
    evs = list(gen.generate(tok.encode("a"), SamplingParams(max_new_tokens=6, seed=3,
                                                            grammar=Grammar.json_schema(SCHEMA, lltok))))
    text = "".join(e.text for e in evs)
    assert evs[-1].finish_reason == "length" and len(evs) == 6
    assert text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_end_tokens_are_allowed_only_where_the_grammar_accepts(tok, lltok, model):
    vocab = model.config.vocab_size
    number = Grammar.json_schema({"type": "integer"}, lltok)
    with_eos, without_eos = number.matcher({0}), number.matcher(set())  # the second: ignore_eos
    start = grammar_masks([with_eos, without_eos], vocab)
    seven = tok.convert_tokens_to_ids("7")
    assert start[:, seven].all() and not start[:, 0].any()  # a digit may start it; EOS may not
    assert not start[:, tok.convert_tokens_to_ids("a")].any()
    assert with_eos.advance(seven) and without_eos.advance(seven)
    after = grammar_masks([with_eos, without_eos], vocab)
    assert with_eos.accepting and not with_eos.complete  # "7" is a number, and "71" would be one too
    assert after[0, 0] and not after[1, 0]
    assert after[:, seven].all()


def test_a_schema_that_cannot_be_compiled_names_response_format(lltok):
    for bad in ({"type": "intger"}, {"$ref": "#/nowhere"}, {"type": "string", "pattern": "(("},
                {"type": "integer", "minimum": "one"}):
        with pytest.raises(GenforgeError) as err:
            Grammar.json_schema(bad, lltok)
        assert err.value.param == "response_format"
        assert "response_format" in err.value.message
