"""`genforge demo --finetune` on a tiny model: the report's table and plots, and held-out topics
that no training row touches."""

from __future__ import annotations

import json

from genforge.cli import main
from genforge.jobs.demo_finetune import run_demo_finetune, split_topics
from tests.train.test_sft import base_run as base_run  # noqa: F401  (the module fixture, shared)


def test_finetune_demo_reports_held_out_figures_on_untrained_topics(tmp_path, base_run):  # noqa: F811
    split = split_topics(heldout=3, dev=2)
    split["train"] = split["train"][:6]
    result = run_demo_finetune(str(tmp_path), base=base_run, sft={"steps": 2, "batch_size": 4},
                               dpo={"steps": 2, "batch_size": 2}, max_new_tokens=4, split=split)
    ft = tmp_path / "demo-finetune"
    report = (ft / "report.md").read_text()
    assert "| held-out measure | pretrained | after SFT | after DPO |" in report
    for row in ("| ROUGE-L F1 of the greedy answer |", "| preference accuracy (per token), rejected: another held-out",
                "| the same, summed log-probability |", "| preference accuracy (per token), rejected: a train topic",
                "| preference accuracy (per token) on 9 of the DPO training pairs"):
        line = next(li for li in report.splitlines() if li.startswith(row))
        assert len(line.split("|")) == 6  # the measure and three figures
    for png in ("sft_loss.png", "dpo.png"):
        assert f"plots/{png}" in report and (ft / "plots" / png).stat().st_size > 1000
    for stage in ("pretrained", "sft", "dpo"):
        assert 0 <= result[stage]["rouge_l"] <= 1
        assert result[stage]["preference"]["pairs"] == result[stage]["preference_vs_train"]["pairs"] == 9
        assert result[stage]["preference_trained_pairs"]["pairs"] == 9

    # held out: no training row asks about a held-out topic or holds one of its paragraphs
    held = set(json.loads((ft / "data" / "split.json").read_text())["heldout"])
    assert held == set(split["heldout"]) and not held & set(split["train"])
    sft_rows = [json.loads(li) for li in (ft / "data" / "sft-train.jsonl").read_text().splitlines()]
    dpo_rows = [json.loads(li) for li in (ft / "data" / "dpo-train.jsonl").read_text().splitlines()]
    assert len(sft_rows) == 18 and len(dpo_rows) == 18
    assert not {r["topic"] for r in sft_rows + dpo_rows} & held
    answers = json.loads((ft / "answers.json").read_text())["dpo"]
    trained_text = {r["messages"][i]["content"] for r in sft_rows for i in (0, 1)}
    trained_text |= {r[k] for r in dpo_rows for k in ("prompt", "chosen", "rejected")}
    assert len(answers) == 9
    assert not {a["question"] for a in answers} & trained_text
    assert not {a["reference"] for a in answers} & trained_text


def test_finetune_demo_without_the_pretrained_demo_says_to_run_it(tmp_path, capsys):
    assert main(["demo", "--finetune", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "make demo" in err[0]
