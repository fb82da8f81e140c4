"""`genforge detect text` and `genforge generate --watermark`: exit codes, one line per input, verdicts."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from genforge.cli import main
from genforge.models.lm import save_lm
from genforge.models.watermark import TextWatermark, green_mask

KEY = "cli-secret"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny Llama over a byte-level tokenizer without merges: decoding and re-tokenising give the
    same ids, so a text built token by token scores exactly as built."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=257, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["abc"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=160,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    # Random weights give near-uniform next tokens (the watermark's best case) but also bytes that are not
    # UTF-8 and the end token, which would make printed text and token ids part ways. A large constant in
    # every embedding's first dimension and a large negative head weight on it for everything but a-z
    # leave only the letters, still near-uniform among themselves.
    letters = [tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = -50.0
        model.lm_head.weight[letters, 0] = 0.0
    folder = tmp_path_factory.mktemp("wm") / "model"
    save_lm(model, tok, folder)
    return folder, tok


def green_letters(tok, n: int, key: str = KEY) -> str:
    """n letters a-z, each green after the one before it under `key` (no (prev, next) pair twice)."""
    wm = TextWatermark.from_secret(key)
    letters = {tok.convert_tokens_to_ids(c): c for c in "abcdefghijklmnopqrstuvwxyz"}
    ids, seen = [next(iter(letters))], set()
    while len(ids) < n:
        mask = green_mask(torch.tensor([wm.signed_key]), torch.tensor([ids[-1]]), len(tok), wm.gamma)[0]
        nxt = next((t for t in letters if mask[t] and (ids[-1], t) not in seen), None)
        if nxt is None:  # a dead end: back off one letter
            ids.pop()
            continue
        seen.add((ids[-1], nxt))
        ids.append(nxt)
    return "".join(letters[i] for i in ids)


def test_detect_text_one_line_per_input(model_dir, tmp_path, capsys):
    folder, tok = model_dir
    marked = green_letters(tok, 60)
    assert main(["detect", "text", marked, "--key", KEY, "--model", str(folder)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("watermarked: z=") and "scored=59" in line and "\n" not in line
    # the wrong key: "not_watermarked", and it says so
    assert main(["detect", "text", marked, "--key", "another", "--model", str(folder)]) == 0
    assert "no watermark for this key (key-id" in capsys.readouterr().out
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": t}) for t in [marked, "Pack my box with five dozen liquor jugs, said the wizard; how vexingly quick daft zebras jump!", "too short"]))
    assert main(["detect", "text", "--jsonl", str(rows), "--field", "body", "--key", KEY, "--model", str(folder),
                 "--json"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in out] == ["watermarked", "not_watermarked", "too_short"]
    assert out[0]["key_id"] == TextWatermark.from_secret(KEY).key_id and out[2]["scored_tokens"] < 32


@pytest.mark.parametrize("args, says", [
    ([], "no key"),
    (["--key", KEY, "--jsonl", "rows.jsonl"], "not both"),
    (["--key", KEY, "--min-tokens", "0"], "--min-tokens"),
])
def test_detect_text_bad_input_is_one_line_exit_2(model_dir, monkeypatch, capsys, args, says):
    monkeypatch.delenv("GENFORGE_WATERMARK_KEY", raising=False)
    assert main(["detect", "text", "some text", "--model", str(model_dir[0]), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0]


def test_generate_watermark_from_env_and_label(model_dir, monkeypatch, capsys):
    folder, _ = model_dir
    monkeypatch.setenv("GENFORGE_WATERMARK_KEY", KEY)
    assert main(["generate", str(folder), "--prompt", "ab", "--max-new-tokens", "120", "--temperature", "1",
                 "--seed", "3", "--label-text", " [AI-generated]"]) == 0
    captured = capsys.readouterr()
    assert captured.out.rstrip("\n").endswith(" [AI-generated]") and "finish: length" in captured.err
    assert f"key-id={TextWatermark.from_secret(KEY).key_id}" in captured.err
    text = captured.out.rstrip("\n").removeprefix("ab").removesuffix(" [AI-generated]")
    monkeypatch.delenv("GENFORGE_WATERMARK_KEY")
    assert main(["detect", "text", text, "--key", KEY, "--model", str(folder)]) == 0
    assert capsys.readouterr().out.startswith("watermarked")
    assert main(["generate", str(folder), "--prompt", "ab", "--watermark-delta", "3"]) == 2
    assert "--watermark-delta needs a key" in capsys.readouterr().err
