"""Suites: the text metrics on known strings, reference perplexity against the loss by hand, the
CLI end to end on a tiny LM (a run, a plain model folder, --compare), and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genforge.cli import main
from genforge.eval.suite import Settings, SuiteItem, answer_suite, load_suite
from genforge.eval.text_metrics import item_scores, score_texts
from genforge.models.generation import SamplingParams, generate
from genforge.models.lm import load_lm, save_lm
from tests.train.test_sft import base_run as base_run  # noqa: F401  (the module fixture, shared)

# char-level model of context 256: LONG fills it, so that item gets no answer and no perplexity
LONG = "the " * 80
ITEMS = [{"prompt": "The for statement", "reference": "is used to iterate", "labels": {"kind": "plain"}},
         {"messages": [{"role": "user", "content": "What is a class?"}], "reference": "A class is a type.",
          "labels": {"kind": "chat"}},
         {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define pass."}],
          "reference": "pass does nothing."},
         {"prompt": "import", "reference": "The import statement"},
         {"prompt": LONG, "reference": "unreachable"}]


def write_suite(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def other_model(base_run, tmp_path_factory) -> Path:  # noqa: F811
    """A plain HF folder (not a run): the base model with its weights perturbed, so it answers differently."""
    model, tokenizer = load_lm(base_run)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    folder = tmp_path_factory.mktemp("other") / "model"
    save_lm(model, tokenizer, folder)
    return folder


def test_metrics_on_known_strings():
    same = item_scores("the cat sat on the mat", "the  cat sat on\nthe mat ")
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    assert same["rouge1"] == same["rouge2"] == same["rougeL"] == 1.0 and same["exact_match"] == 1.0
    disjoint = item_scores("xyz qqq www", "the cat sat on the mat")
    assert disjoint == {"bleu": 0.0, "chrf": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": 0.0}
    assert item_scores("the cat", "The cat.")["exact_match"] == 0.0  # only whitespace is normalised
    items, corpus = score_texts(["the cat sat on the mat", "xyz qqq www"], ["the cat sat on the mat", "a b c"])
    assert [s["exact_match"] for s in items] == [1.0, 0.0]
    assert corpus["rougeL"] == pytest.approx(0.5) and corpus["exact_match"] == 0.5
    assert 0 < corpus["bleu"] < 100 and 0 < corpus["chrf"] < 100  # pooled n-grams: half the text matches


def test_reference_perplexity_is_exp_of_the_loss_by_hand(base_run):  # noqa: F811
    item = SuiteItem("t", "is used to iterate", prompt="The for statement")
    row = answer_suite(base_run, [item], Settings(max_new_tokens=4), "t")["rows"][0]
    model, tokenizer = load_lm(base_run)
    prompt = tokenizer(item.prompt)["input_ids"]
    reference = tokenizer(item.reference, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + reference])).logits[0]
    loss = F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(reference))
    assert row["metrics"]["reference_tokens"] == len(reference) == len(item.reference)  # char-level
    assert row["metrics"]["reference_nll"] == pytest.approx(float(loss), rel=1e-4)
    assert row["metrics"]["reference_perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_cli_suite_on_a_run_writes_rows_summary_and_report(base_run, tmp_path, capsys):  # noqa: F811
    suite = write_suite(tmp_path / "mini.jsonl", ITEMS)
    assert main(["eval", str(base_run), "--suite", str(suite), "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "suite mini: 5 items" in out and "ROUGE-L F1" in out and "reference perplexity" in out
    folder = base_run / "eval" / "mini"
    rows = [json.loads(li) for li in (folder / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and [r["reference"] for r in rows] == [i["reference"] for i in ITEMS]
    assert rows[0]["prompt"] == "The for statement" and rows[1]["messages"] == ITEMS[1]["messages"]
    assert rows[0]["labels"] == {"kind": "plain"} and rows[2]["labels"] == {}
    for r in rows[:4]:
        assert 0 <= r["metrics"]["chrf"] <= 100 and r["metrics"]["reference_perplexity"] > 1
    # the engine's batched answers (2 rows at a time, 5 items) are what one greedy sequence alone gives
    model, tokenizer = load_lm(base_run)
    for r in (rows[0], rows[3]):
        alone = generate(model, tokenizer, tokenizer(r["prompt"])["input_ids"],
                         SamplingParams(max_new_tokens=6, temperature=0.0))
        assert r["output"] == "".join(ev.text for ev in alone).strip() != ""
    assert rows[4]["output"] == "" and rows[4]["metrics"]["reference_perplexity"] is None  # prompt fills context
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["run"]["counts"]["perplexity_skipped_prompt_fills_context"] == 1
    assert summary["run"]["counts"]["not_generated_prompt_fills_context"] == 1
    assert summary["run"]["metrics"]["exact_match"] == pytest.approx(sum(r["metrics"]["exact_match"] for r in rows) / 5)
    assert summary["settings"]["temperature"] == 0.0 and "compared" not in summary
    assert summary["run"]["by_label"]["kind"]["chat"]["chrf"] == rows[1]["metrics"]["chrf"]
    report = (base_run / "report.md").read_text()
    assert "## Suite `mini`" in report and "| ROUGE-L F1 |" in report and "## Training" in report
    assert "1 item has no reference perplexity" in report
    # a rerun replaces its section; the greedy answers are the same
    assert main(["eval", str(base_run), "--suite", str(suite), "--max-new-tokens", "6"]) == 0
    assert (base_run / "report.md").read_text().count("## Suite `mini`") == 1
    again = [json.loads(li) for li in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["output"] for r in again] == [r["output"] for r in rows]


def test_compare_and_a_model_folder(base_run, other_model, tmp_path, capsys):  # noqa: F811
    suite = write_suite(tmp_path / "cmp.jsonl", ITEMS[:4])
    # a model folder has no run directory: --out is required, and then holds the results
    assert main(["eval", str(other_model), "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0]
    assert main(["eval", str(other_model), "--suite", str(suite), "--max-new-tokens", "4",
                 "--out", str(tmp_path / "res")]) == 0
    assert len((tmp_path / "res" / "cmp" / "results.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()

    assert main(["eval", str(base_run), "--suite", str(suite), "--compare", str(other_model),
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "A - B" in out and "ROUGE-L F1" in out and "B: " in out
    folder = base_run / "eval" / "cmp"
    a = [json.loads(li) for li in (folder / "results.jsonl").read_text().splitlines()]
    b = [json.loads(li) for li in (folder / "compared.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in a] == [r["reference"] for r in b] and len(b) == 4
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["compared"]["model"] == str(other_model)
    for k, v in summary["difference"].items():
        assert v == pytest.approx(summary["run"]["metrics"][k] - summary["compared"]["metrics"][k])
    # the perturbed model finds the references far less likely
    assert summary["compared"]["metrics"]["reference_perplexity"] > summary["run"]["metrics"]["reference_perplexity"]
    gaps = [abs(d["chrf_a"] - d["chrf_b"]) for d in summary["differing_items"]]
    assert gaps and gaps == sorted(gaps, reverse=True) and gaps[0] > 0
    report = (base_run / "report.md").read_text()
    assert f"Compared with `{other_model}`" in report and "### Items that differ most" in report
    assert f"item {summary['differing_items'][0]['index']}:" in report


@pytest.mark.parametrize("rows, message", [
    ([ITEMS[0], '{"prompt": "x", "reference": '], "line 2: not valid JSON"),
    ([ITEMS[0], "", {"prompt": "x"}], "line 3: missing `reference`"),
    ([{"prompt": "x", "reference": 3}], "line 1: `reference` must be a string"),
    ([{"reference": "x"}], "line 1: has neither of `prompt` and `messages`"),
    ([{"prompt": "x", "messages": [], "reference": "y"}], "line 1: has both"),
    ([{"prompt": ["x"], "reference": "y"}], "line 1: `prompt` must be a non-empty string"),
    ([{"messages": [{"role": "user"}], "reference": "y"}], "line 1: messages[0] must be an object"),
    ([{"messages": "hi", "reference": "y"}], "line 1: `messages` must be a non-empty list"),
    ([{"prompt": "x", "reference": "y", "labels": {"a": 1}}], "line 1: `labels` must be an object of strings"),
    (["[1, 2]"], "line 1: a suite line must be a JSON object"),
    (["", "  "], "the suite is empty"),
])
def test_bad_suite_lines_name_the_file_and_line(base_run, tmp_path, capsys, rows, message):  # noqa: F811
    suite = write_suite(tmp_path / "bad.jsonl", rows)
    assert main(["eval", str(base_run), "--suite", str(suite)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(suite) in err[0] and message in err[0]
    assert not (base_run / "eval" / "bad").exists()


def test_bad_runs_and_options(base_run, tmp_path, capsys):  # noqa: F811
    suite = write_suite(tmp_path / "ok.jsonl", ITEMS[:1])
    no_model = tmp_path / "unfinished"
    no_model.mkdir()
    (no_model / "recipe.yaml").write_text("name: unfinished\nfamily: lm\n")
    cases = [(["eval", str(no_model), "--suite", str(suite)], "no exported model"),
             (["eval", str(base_run), "--suite", str(suite), "--compare", str(tmp_path / "nowhere")], "not found"),
             (["eval", str(base_run), "--suite", str(tmp_path / "missing.jsonl")], "suite file not found"),
             (["eval", str(base_run), "--suite", "builtin:nope"], "builtin:pydoc-qa"),
             (["eval", str(base_run), "--compare", str(base_run)], "--suite"),
             (["eval", str(base_run), "--suite", str(suite), "--temperature", "-1"], "temperature")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert not (no_model / "eval").exists() and not (base_run / "eval" / "ok").exists()


def test_builtin_pydoc_qa_suite():
    name, items = load_suite("builtin:pydoc-qa")
    assert name == "pydoc-qa" and len(items) == len({i.labels["topic"] for i in items}) > 50
    assert all(i.messages[0]["role"] == "user" and i.reference for i in items)
