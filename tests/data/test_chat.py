"""SFT data: rows -> conversations, the assistant-only mask (exact positions), EOS, truncation,
batches (pure in their index), and packing that keeps examples from seeing each other."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from genforge.common.config import from_dict
from genforge.common.errors import DataError
from genforge.data.chat import (
    IGNORE,
    PYDOC_INSTRUCTIONS,
    ChatBatches,
    Conversation,
    Example,
    collate,
    encode_conversation,
    encode_conversations,
    read_conversations,
    source_identity,
    to_messages,
)
from genforge.data.instructions import pydoc_instructions
from genforge.data.tokens import TokenDataset
from genforge.models.lm import DEFAULT_CHAT_TEMPLATE, LMSpec, build_lm_config, create_lm


@pytest.fixture(scope="module")
def tok(char_dataset):
    """A char-level tokenizer: one token per character, so positions follow from string lengths."""
    return TokenDataset(char_dataset).tokenizer


def _ids(tok, text: str) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    return ids


def _msgs(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def _encode(tok, messages, template=DEFAULT_CHAT_TEMPLATE, where="t.jsonl:1"):
    return encode_conversation(tok, template, Conversation(messages, where), {tok.eos_token_id}, tok.eos_token_id)


def test_multi_turn_mask_is_exactly_the_assistant_replies_and_their_eos(tok):
    msgs = _msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "AB"), ("user", "Q"), ("assistant", "CD"))
    turn = lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n"  # noqa: E731
    p1 = turn("system", "Be brief.") + turn("user", "Hi") + "<|im_start|>assistant\n"
    p2 = p1 + "AB<|im_end|>\n" + turn("user", "Q") + "<|im_start|>assistant\n"
    full = p2 + "CD<|im_end|>\n"
    ex = _encode(tok, msgs)
    assert ex.input_ids == _ids(tok, full)  # the input is the template's rendering, nothing added
    expected = [IGNORE] * len(full)
    a, b, c, d = _ids(tok, "ABCD")
    # position t predicts token t+1: the reply's first token is predicted from the header's last one,
    # and after the reply's last token the target is EOS (ChatML's <|im_end|> is not one token here)
    expected[len(p1) - 1:len(p1) + 2] = [a, b, tok.eos_token_id]
    expected[len(p2) - 1:len(p2) + 2] = [c, d, tok.eos_token_id]
    assert ex.labels == expected


def test_a_stop_token_the_template_writes_is_supervised_as_it_is(tok):
    eos = tok.eos_token
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                "{% if m['role'] == 'assistant' %}" + eos + "{% endif %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    ex = _encode(tok, _msgs(("user", "Hi"), ("assistant", "AB")), template)
    prompt = "user: Hi\nassistant: "
    assert ex.input_ids == _ids(tok, prompt + "AB") + [tok.eos_token_id] + _ids(tok, "\n")
    # A, B and the template's own EOS are targets; the newline after the turn is not
    assert ex.labels == [IGNORE] * (len(prompt) - 1) + _ids(tok, "AB") + [tok.eos_token_id, IGNORE, IGNORE]


def test_content_cannot_forge_control_tokens(tok):
    ex = _encode(tok, _msgs(("user", "x"), ("assistant", tok.eos_token + "y")))
    assert ex.input_ids.count(tok.eos_token_id) == 0  # typed EOS stays characters
    assert ex.labels.count(tok.eos_token_id) == 1  # only the supervised end of turn


def test_template_errors_name_the_row(tok):
    bad = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match=r"^t.jsonl:1: the chat template cannot render this conversation: "
                                        r"roles must alternate"):
        _encode(tok, _msgs(("user", "x"), ("assistant", "y")), bad)
    last_only = "{{ messages[-1]['content'] }}"  # rewrites the conversation at every turn
    with pytest.raises(DataError, match="t.jsonl:1: the chat template does not render message 1 as an extension"):
        _encode(tok, _msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), last_only)


def test_rows_chat_and_alpaca():
    assert to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "system": "S"}, "w") == _msgs(
        ("system", "S"), ("user", "Sum\n\n1 2"), ("assistant", "3"))
    assert to_messages({"instruction": "Hi", "output": "Yo", "extra": 1}, "w") == _msgs(("user", "Hi"),
                                                                                         ("assistant", "Yo"))
    m = [{"role": "user", "content": "a", "name": "ann"}, {"role": "assistant", "content": "b"}]
    assert to_messages({"messages": m}, "w") == m


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x"}, "f.jsonl:3: an alpaca row needs string fields instruction and output; output is missing"),
    ({"output": 3}, "f.jsonl:3: an alpaca row needs .* instruction and output are missing"),
    ({"prompt": "x"}, r"f.jsonl:3: a row needs `messages` \(chat\) or `instruction` and `output`"),
    ({"messages": []}, "f.jsonl:3: `messages` must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"f.jsonl:3: messages\[0\] must be an object with a string `role`"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl:3: the conversation has no assistant turn"),
])
def test_bad_rows_name_file_and_line(row, message):
    with pytest.raises(DataError, match=message):
        to_messages(row, "f.jsonl:3")


def test_read_conversations_from_jsonl_and_builtin(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"messages": _msgs(("user", "c"), ("assistant", "d"))}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    convs = read_conversations(str(path))
    assert [c.where for c in convs] == [f"{path}:1", f"{path}:2"]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: "):
        read_conversations(str(path))
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=f"^{path}:1: not valid JSON"):
        read_conversations(str(path))
    with pytest.raises(DataError, match="does not exist"):
        source_identity(str(tmp_path / "none.jsonl"))
    assert len(read_conversations(PYDOC_INSTRUCTIONS)) == len(pydoc_instructions(0))
    assert source_identity(PYDOC_INSTRUCTIONS) == source_identity(PYDOC_INSTRUCTIONS)


def test_pydoc_instructions():
    rows = pydoc_instructions(0)
    assert rows != pydoc_instructions(1) and sorted(map(json.dumps, rows)) == sorted(
        map(json.dumps, pydoc_instructions(1)))  # the seed only orders them
    by_topic = {r["topic"]: r["messages"] for r in rows}
    assert len(by_topic) > 60 and len(rows) == 3 * len(by_topic)
    user, answer = by_topic["with"]
    assert 'the "with" statement' in user["content"]
    assert answer["content"].startswith('The "with" statement is used to wrap the execution of a block')
    assert all(20 < len(m[1]["content"]) <= 360 for m in by_topic.values())


def test_truncation_drops_examples_without_a_supervised_token(tok):
    short = Conversation(_msgs(("user", "hi"), ("assistant", "ok")), "f:1")
    long = Conversation(_msgs(("user", "x" * 80), ("assistant", "ok")), "f:2")
    examples, dropped = encode_conversations([short, long], tok, DEFAULT_CHAT_TEMPLATE, 60,
                                             {tok.eos_token_id}, tok.eos_token_id)
    assert dropped == 1 and len(examples) == 1 and len(examples[0].input_ids) <= 60
    with pytest.raises(DataError, match="no example keeps an assistant token within max_length 60"):
        encode_conversations([long], tok, DEFAULT_CHAT_TEMPLATE, 60, {tok.eos_token_id}, tok.eos_token_id)


def _examples(tok, n: int) -> list[Example]:
    convs = [Conversation(_msgs(("user", f"q{i}" * (1 + i % 3)), ("assistant", "answer " * (1 + i % 4))), f"f:{i}")
             for i in range(n)]
    return encode_conversations(convs, tok, DEFAULT_CHAT_TEMPLATE, 128, {tok.eos_token_id}, tok.eos_token_id)[0]


@pytest.mark.parametrize("packing", [False, True])
def test_batches_are_a_pure_function_of_the_index(tok, packing):
    examples = _examples(tok, 20)
    a = ChatBatches(examples, 4, 128, tok.pad_token_id, seed=3, val_fraction=0.2, packing=packing)
    b = ChatBatches(examples, 4, 128, tok.pad_token_id, seed=3, val_fraction=0.2, packing=packing)
    assert (a.n_train, a.n_val) == (16, 4)
    for i in (7, 0, 7, 31):  # any order, any epoch
        x, y = a.train_batch(i), b.train_batch(i)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert a.tokens_per_batch == (4 * 128 if packing else None)
    rows = [r for v in a.val_batches(10) for r in v["labels"]]  # every held-out row, each supervised
    assert len(rows) == len(a.val_units) == (len(a.val_units) if packing else 4)
    assert all((r != IGNORE).any() for r in rows)


def test_packing_restarts_positions_and_isolates_examples(tok):
    e1, e2 = _examples(tok, 2)
    n1, n2 = len(e1.input_ids), len(e2.input_ids)
    length = n1 + n2 + 5  # and a little padding at the end of the row
    packed = collate([[e1, e2]], tok.pad_token_id, length)
    assert packed["position_ids"][0, :n1 + n2].tolist() == list(range(n1)) + list(range(n2))
    mask = packed["attention_mask"][0, 0]
    assert mask.shape == (length, length)
    assert not mask[n1:n1 + n2, :n1].any() and mask[n1 + 3, n1:n1 + 4].all() and not mask[n1 + 3, n1 + 4:].any()

    spec = from_dict(LMSpec, {"preset": "lm-nano", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                              "num_kv_heads": 1, "intermediate_size": 64, "context_length": 256})
    torch.manual_seed(0)
    model = create_lm(build_lm_config(spec, tok)).eval()

    def run(batch):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch.get("position_ids"), use_cache=False).logits

    together = run(packed)
    for ex, offset in ((e1, 0), (e2, n1)):
        alone = run(collate([[ex]], tok.pad_token_id, None))
        n = len(ex.input_ids)
        torch.testing.assert_close(together[0, offset:offset + n], alone[0, :n], atol=1e-5, rtol=1e-5)
        labels = torch.tensor(ex.labels)
        loss_alone = F.cross_entropy(alone[0, :n], labels, ignore_index=IGNORE)
        loss_packed = F.cross_entropy(together[0, offset:offset + n], packed["labels"][0, offset:offset + n],
                                      ignore_index=IGNORE)
        torch.testing.assert_close(loss_packed, loss_alone, atol=1e-5, rtol=1e-5)
