"""genforge data synth: a teacher answers prompts through the batching generator; rows are deduplicated
(normalised), filtered by length and by the teacher's perplexity (each counted), record how they were
made, and read back as SFT data; bad input is a one-line error that writes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import genforge.jobs.synth as synth_job
from genforge.cli import main
from genforge.common.errors import ConfigError, DataError
from genforge.data.chat import encode_conversation, read_conversations
from genforge.jobs.synth import synthesize
from genforge.jobs.train import run_recipe
from genforge.models.lm import load_lm, resolve_chat_template

TINY = {"preset": "lm-nano", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64, "context_length": 128}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, char_dataset) -> Path:
    """A tiny chat model fine-tuned to answer every question with 'ok' and end its turn."""
    root = tmp_path_factory.mktemp("teacher")
    base = {"name": "base", "family": "lm", "dataset": str(char_dataset), "out_dir": str(root), "model": TINY,
            "train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1}}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    run_recipe(root / "base.yaml")
    rows = [{"instruction": f"question {i} " + "abc"[i % 3] * (i % 5), "output": "ok"} for i in range(40)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = {"name": "sft", "family": "sft", "base": str(root / "base"), "dataset": str(root / "sft.jsonl"),
           "out_dir": str(root), "data": {"max_length": 128},
           "train": {"max_steps": 60, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "eval_every": 60,
                     "eval_batches": 1, "checkpoint_every": 60, "seed": 5}}
    (root / "sft.yaml").write_text(yaml.safe_dump(sft))
    run_recipe(root / "sft.yaml")
    return root / "sft"


def _prompts(tmp_path: Path) -> Path:
    """Three distinct prompts; the fourth line is the first again, up to case and spacing."""
    p = tmp_path / "prompts.txt"
    p.write_text("question 1 b\nquestion 2 cc\n\nquestion 3 a\n  Question  1 B\n")
    return p


def test_rows_dedupe_meta_and_the_sft_reader(teacher, tmp_path):
    out = tmp_path / "syn.jsonl"
    stats = synthesize(teacher, _prompts(tmp_path), out, n_per_prompt=3, temperature=0.0, max_new_tokens=8,
                       batch_size=5)
    # greedy: a prompt's 3 answers are identical, and the 4th prompt normalises to the 1st
    assert (stats["prompts"], stats["generated"], stats["truncated"]) == (4, 12, 0)
    assert stats["duplicates"] == 9 and stats["written"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][-1] for r in rows] == [{"role": "assistant", "content": "ok"}] * 3
    meta = rows[0]["meta"]
    assert meta["teacher"] == str((teacher / "model").resolve()) and len(meta["teacher_hash"]) == 16
    assert (meta["temperature"], meta["max_new_tokens"], meta["seed"], meta["sample"]) == (0.0, 8, 0, 0)
    assert meta["prompt"].endswith("prompts.txt:1") and meta["perplexity"] >= 1.0
    assert json.loads((tmp_path / "syn.stats.json").read_text())["written"] == 3

    # the recorded perplexity is the teacher's on the rendered prompt + answer + EOS
    model, tok = load_lm(teacher)
    template = resolve_chat_template(tok)
    conv = read_conversations(str(out))[0]  # the SFT reader takes the rows as they are
    ex = encode_conversation(tok, template, conv, {tok.eos_token_id}, tok.eos_token_id)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    keep = labels[0] != -100  # labels[t] is the token after position t
    nll = torch.nn.functional.cross_entropy(logits[keep], labels[0][keep])
    assert meta["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-3)


def test_length_and_perplexity_filters_count(teacher, tmp_path, monkeypatch):
    prompts = _prompts(tmp_path)
    stats = synthesize(teacher, prompts, tmp_path / "short.jsonl", temperature=0.0, max_new_tokens=8, min_chars=3)
    assert (stats["too_short"], stats["written"]) == (3, 0)
    stats = synthesize(teacher, prompts, tmp_path / "long.jsonl", temperature=0.0, max_new_tokens=8, max_chars=1)
    assert (stats["too_long"], stats["written"]) == (3, 0)
    # the perplexity filter on known scores: 1.5 and 9.0 stay under 10, 12.0 does not
    monkeypatch.setattr(synth_job, "continuation_perplexity", lambda model, pairs: [1.5, 12.0, 9.0][:len(pairs)])
    stats = synthesize(teacher, prompts, tmp_path / "ppl.jsonl", temperature=0.0, max_new_tokens=8,
                       max_perplexity=10.0)
    assert (stats["high_perplexity"], stats["written"]) == (1, 2)
    kept = [json.loads(line)["meta"]["perplexity"] for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert kept == [1.5, 9.0]


def test_answers_cut_at_max_new_tokens_are_dropped_and_sampling_is_seeded(teacher, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "question 7 a"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "be short"}, {"role": "user", "content": "question 8"}]}) + "\n")
    stats = synthesize(teacher, prompts, tmp_path / "cut.jsonl", temperature=0.0, max_new_tokens=1)
    assert (stats["truncated"], stats["written"]) == (2, 0)
    a = synthesize(teacher, prompts, tmp_path / "a.jsonl", n_per_prompt=2, temperature=1.5, seed=3, batch_size=1)
    b = synthesize(teacher, prompts, tmp_path / "b.jsonl", n_per_prompt=2, temperature=1.5, seed=3, batch_size=4)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()  # batching changes nothing
    assert a["generated"] == b["generated"] == 4
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(r["messages"][0]["role"] in ("user", "system") for r in rows)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": ""}\n', "p.jsonl:1: a prompt row needs a non-empty string `prompt`"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     "p.jsonl:1: the last message must be the user's turn"),
    ('{"prompt": "q"}\nnot json\n', "p.jsonl:2: not valid JSON"),
    ("\n\n", "no prompts"),
])
def test_bad_prompts_name_the_line(teacher, tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        synthesize(teacher, tmp_path / "p.jsonl", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_bad_input_is_one_line_exit_2(teacher, tmp_path, capsys):
    prompts = _prompts(tmp_path)
    with pytest.raises(ConfigError, match="--max-perplexity 0.5"):
        synthesize(teacher, prompts, tmp_path / "o.jsonl", max_perplexity=0.5)
    assert main(["data", "synth", "--teacher", str(teacher), "--prompts", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --prompts") and "does not exist" in err and "\n" not in err
    assert main(["data", "synth", "--teacher", str(tmp_path / "none"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    assert main(["data", "synth", "--teacher", str(teacher), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o.jsonl"), "--temperature", "0", "--max-new-tokens", "8"]) == 0
    assert "3 rows written" in capsys.readouterr().out
    assert main(["data", "synth", "--teacher", str(teacher), "--prompts", str(prompts),
                 "--out", str(tmp_path / "o.jsonl")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
