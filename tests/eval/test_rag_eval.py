"""RAG evaluation (eval/rag.py + the judge's faithfulness): a real index in a real store, a real
model answering with the retrieved sources in its prompt, retrieval hit rates checked against the
labels, and faithfulness judged by `genforge serve` as the judge over HTTP."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genforge.cli import main
from genforge.eval.judge import InvalidJudgment, parse_judgment
from genforge.eval.judge_suite import summarize_faithfulness
from genforge.models.lm import save_lm
from tests.eval.test_judge import JUDGE_NAME, judge_model, judge_server  # noqa: F401  (module fixtures)
from tests.serve.conftest import tok  # noqa: F401  (a fixture)

pytest.importorskip("sentence_transformers")

DOCS = {"espresso.txt": "Espresso is brewed by forcing hot water through finely ground coffee at nine bars of "
                        "pressure for about twenty-five seconds.",
        "tides.txt": "Tides rise and fall twice a day because the gravity of the moon pulls the oceans toward it.",
        "bees.txt": "Honey bees communicate where flowers are with a waggle dance performed inside the hive."}
QUESTIONS = [("How is espresso brewed?", "espresso.txt"), ("Why do the tides rise and fall?", "tides.txt"),
             ("How do honey bees tell each other where flowers are?", "bees.txt")]


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> tuple[str, Path]:
    """An index of three one-chunk documents, built with `genforge rag ingest` in its own store."""
    root = tmp_path_factory.mktemp("rag-eval")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text + "\n")
    store = root / "store"
    assert main(["rag", "ingest", str(docs), "--index", "facts", "--store", str(store)]) == 0
    return str(store), docs


@pytest.fixture(scope="module")
def answerer(judge_model, tok, tmp_path_factory) -> Path:  # noqa: F811
    """A model folder with a 1024-token context (the judge's random tiny Llama): room for sources."""
    folder = tmp_path_factory.mktemp("answerer") / "model"
    save_lm(judge_model, tok, folder)
    return folder


def suite_file(tmp_path: Path, docs: Path, *, chat: bool = True, labelled: bool = True) -> Path:
    rows = []
    for question, name in QUESTIONS:
        asked = {"messages": [{"role": "user", "content": question}]} if chat else {"prompt": question}
        rows.append({**asked, "reference": DOCS[name], **({"labels": {"source": str(docs / name)}} if labelled
                                                          else {})})
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_carry_the_sources_that_fit_and_retrieval_is_scored_against_the_labels(index, answerer, tmp_path,
                                                                                       capsys):
    store, docs = index
    suite = suite_file(tmp_path, docs)
    out = tmp_path / "out"
    args = ["eval", str(answerer), "--suite", str(suite), "--out", str(out), "--rag", "facts", "--rag-store", store,
            "--rag-k", "2", "--batch-size", "3"]
    assert main([*args, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "retrieval hit@1" in printed and "relevant source in prompt" in printed
    results = out / "facts-rag-facts"  # beside the plain answers, not over them
    rows = rows_of(results / "results.jsonl")
    for row, (_, name) in zip(rows, QUESTIONS):
        rag = row["rag"]
        assert rag["target"] == str(docs / name) and len(rag["sources"]) == 2
        assert rag["sources"][0]["source"] == str(docs / name) and rag["rank"] == 1  # each question finds its doc
        assert rag["sources_in_prompt"] == 2 and all(s["in_prompt"] for s in rag["sources"])
        assert rag["sources"][0]["text"].startswith(f"[1] ({name}) ")  # numbered as the server numbers them
        assert row["messages"][0]["content"] == QUESTIONS[rows.index(row)][0]  # the row keeps the question
    summary = json.loads((results / "summary.json").read_text())
    retrieval = summary["run"]["retrieval"]
    assert retrieval["hit@1"] == retrieval["hit@2"] == retrieval["hit_in_prompt"] == retrieval["mrr"] == 1.0
    assert retrieval["mean_sources_in_prompt"] == 2 and retrieval["k"] == 2
    assert "retrieval from index `facts`" in (results / "report.md").read_text()
    plain_tokens = [r["prompt_tokens"] for r in rows]

    # No room beside the answer: the sources are dropped (as the server drops them), the hit rate of
    # the retrieval stands, and the share of prompts that held a relevant source falls to zero.
    assert main([*args, "--max-new-tokens", "1000"]) == 0
    rows = rows_of(results / "results.jsonl")
    assert [r["rag"]["sources_in_prompt"] for r in rows] == [0, 0, 0]
    assert all(r["prompt_tokens"] < t for r, t in zip(rows, plain_tokens))
    retrieval = json.loads((results / "summary.json").read_text())["run"]["retrieval"]
    assert retrieval["hit@1"] == 1.0 and retrieval["hit_in_prompt"] == 0.0 and retrieval["items_without_sources"] == 3


def test_without_target_labels_there_is_no_hit_rate_and_prompts_get_the_sources_too(index, answerer, tmp_path):
    store, docs = index
    suite = suite_file(tmp_path, docs, chat=False, labelled=False)
    assert main(["eval", str(answerer), "--suite", str(suite), "--out", str(tmp_path / "o"), "--rag", "facts",
                 "--rag-store", store, "--rag-k", "1", "--rag-mode", "bm25", "--max-new-tokens", "2"]) == 0
    results = tmp_path / "o" / "facts-rag-facts"
    retrieval = json.loads((results / "summary.json").read_text())["run"]["retrieval"]
    assert retrieval["items_with_target"] == 0 and "hit@1" not in retrieval and retrieval["mode"] == "bm25"
    row = rows_of(results / "results.jsonl")[0]
    assert row["rag"]["rank"] is None and row["rag"]["sources"][0]["relevant"] is None
    assert "no hit rate" in (results / "report.md").read_text()


def test_faithfulness_is_judged_against_the_sources_in_the_prompt(index, answerer, judge_server, tmp_path):  # noqa: F811
    store, docs = index
    suite = suite_file(tmp_path, docs)
    out = tmp_path / "out"
    assert main(["eval", str(answerer), "--suite", str(suite), "--out", str(out), "--rag", "facts", "--rag-store",
                 store, "--rag-k", "1", "--max-new-tokens", "4", "--judge-url", judge_server.v1, "--judge-model",
                 JUDGE_NAME, "--judge-mode", "faithfulness", "--judge-repeats", "1", "--judge-max-tokens", "200",
                 "--judge-temperature", "1.0"]) == 0
    results = out / "facts-rag-facts"
    judgments = rows_of(results / "judgments.jsonl")
    assert {j["kind"] for j in judgments} == {"faithfulness"} and len(judgments) == 3
    summary = json.loads((results / "judge.json").read_text())["faithfulness"]
    ok = [j for j in judgments if j["ok"]]
    # whatever the random judge said, the figures are what its valid judgments add up to
    assert summary["claims"] == sum(j["total"] for j in ok) and summary["items_with_sources"] == 3
    assert summary["supported_claims"] == sum(sum(c["supported"] for c in j["claims"]) for j in ok)
    assert summary["failed"] == len(judgments) - len(ok)
    assert "Faithfulness (" in (results / "judge.md").read_text()
    # --judge-only reruns from the cache: no new HTTP calls
    before = json.loads((results / "judge.json").read_text())["http_calls"]
    assert before >= 3
    assert main(["eval", str(answerer), "--suite", str(suite), "--out", str(out), "--rag", "facts", "--judge-only",
                 "--judge-url", judge_server.v1, "--judge-model", JUDGE_NAME, "--judge-mode", "faithfulness",
                 "--judge-repeats", "1", "--judge-max-tokens", "200", "--judge-temperature", "1.0"]) == 0
    assert json.loads((results / "judge.json").read_text())["http_calls"] == 0


class ScriptedJudge(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint that judges by rule, to check what reaches the judge and
    how its judgments add up (a random tiny model, above, only ever answers with no claims): one
    claim per numbered source in the prompt, supported when the source's document is about what
    the question asks (its first word appears in the source)."""

    def __init__(self):
        self.prompts: list[str] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = "\n".join(m["content"] for m in body["messages"])
                judge.prompts.append(prompt)
                question = prompt.split("Question:\n", 1)[1].split("\n", 1)[0]
                topic = question.split()[-1].rstrip("?").lower()  # "brewed", "fall", "are"
                sources = re.findall(r"^\[\d+\] .*$", prompt, flags=re.M)
                claims = [{"claim": s[:40], "supported": topic in s.lower()} for s in sources]
                content = json.dumps({"claims": claims})
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


def test_the_judge_sees_the_sources_each_prompt_held_and_faithfulness_adds_up(index, answerer, tmp_path):
    store, docs = index
    suite = suite_file(tmp_path, docs)
    judge = ScriptedJudge()
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    try:
        assert main(["eval", str(answerer), "--suite", str(suite), "--out", str(tmp_path / "o"), "--rag", "facts",
                     "--rag-store", store, "--rag-k", "2", "--max-new-tokens", "2", "--judge-url", judge.url,
                     "--judge-model", "rules", "--judge-repeats", "1"]) == 0  # default mode: pointwise + faithfulness
    finally:
        judge.shutdown()
    results = tmp_path / "o" / "facts-rag-facts"
    faithful = {p.split("Question:\n", 1)[1].split("\n", 1)[0]: p for p in judge.prompts if "Answer to check:" in p}
    assert len(faithful) == 3
    for question, name in QUESTIONS:
        prompt = faithful[f"user: {question}"]  # chat rows are shown to the judge as "role: content"
        assert f"[1] ({name}) {DOCS[name]}" in prompt  # the source the answer's prompt held, numbered as there
        assert "[2] (" in prompt and "[3] (" not in prompt  # --rag-k 2: both fit
    summary = json.loads((results / "judge.json").read_text())
    # each prompt: its own document ([1], supported) and another ([2], not): 3 of 6 claims supported
    f = summary["faithfulness"]
    assert (f["supported_claims"], f["claims"], f["items_with_claims"]) == (3, 6, 3)
    assert f["faithfulness"] == pytest.approx(0.5) and f["faithfulness_micro"] == pytest.approx(0.5)
    assert summary["pointwise"]["failed"] == 3  # the rule judge answers claims, not scores: rejected, not counted


def test_faithfulness_judgments_parse_strictly_and_add_up():
    judgment, _ = parse_judgment('{"claims": [{"claim": "a", "supported": true}, {"claim": "b", "supported": false}]}',
                                 "faithfulness")
    assert (judgment["supported"], judgment["total"], judgment["faithfulness"]) == (1, 2, 0.5)
    assert parse_judgment('{"claims": []}', "faithfulness")[0]["faithfulness"] is None  # no claim: undefined
    for bad in ('{"claims": [{"claim": "a", "supported": "yes"}]}', '{"claims": "a"}', '{"score": 3}'):
        with pytest.raises(InvalidJudgment):
            parse_judgment(bad, "faithfulness")

    def row(item, repeat, supported, total, ok=True):
        return {"id": item, "kind": "faithfulness", "side": "a", "repeat": repeat, "ok": ok, "supported": supported,
                "total": total, "faithfulness": supported / total if total else None, "invalid": 0,
                "out_of_rubric": 0, "repaired": False, "cached": False}

    items = [{"id": "p", "sources_a": ["[1] x"]}, {"id": "q", "sources_a": ["[1] y"]}, {"id": "r", "sources_a": []}]
    per_item, summary = summarize_faithfulness(items, [row("p", 0, 1, 2), row("p", 1, 2, 2), row("q", 0, 0, 0),
                                                       row("q", 1, 0, 3, ok=False)])
    assert per_item["p"]["mean"] == pytest.approx(0.75) and "q" not in per_item
    assert summary["faithfulness"] == pytest.approx(0.75) and summary["faithfulness_micro"] == pytest.approx(3 / 4)
    assert (summary["items_with_sources"], summary["items_without_claims"], summary["failed"]) == (2, 1, 1)


def test_bad_rag_input_is_one_clear_line_and_exit_2(index, answerer, tmp_path, capsys):
    store, docs = index
    suite = suite_file(tmp_path, docs)
    base = ["eval", str(answerer), "--suite", str(suite), "--out", str(tmp_path / "o"), "--max-new-tokens", "2"]
    cases = [([*base, "--rag", "nope", "--rag-store", store], "--rag nope: no such index"),
             ([*base, "--rag-mode", "bm25"], "--rag-store and --rag-mode need --rag INDEX"),
             ([*base, "--rag", "facts", "--rag-store", store, "--rag-k", "30"], "--rag-k must be 1-20")]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "Why?", "reference": "x", "labels": {"source": "/no/such.txt"}}) + "\n")
    cases.append(([*base[:3], str(other), *base[4:], "--rag", "facts", "--rag-store", store],
                  "target sources named by the suite's labels are not in the index"))
    for args, message in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()  # nothing written
