"""The judge client (eval/judge.py) end to end against `genforge serve` as the judge: a real HTTP
peer (uvicorn on a real port), the real `openai` client, a tiny random-weight model.

A random model writes no sensible judgment; it answers in valid JSON only because the server
constrains its decoding to the schema the judge sends (response_format json_schema). Without
response_format it writes noise, which is exactly the badly answering judge the retry path is for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genforge.eval.judge import (
    InvalidJudgment,
    Judge,
    JudgeConfig,
    JudgeError,
    JudgeUnreachableError,
    OutOfRubric,
    first_json_object,
    parse_judgment,
)
from genforge.eval.judge_suite import judge_items
from tests.serve.conftest import Live, serve_in_thread, tok  # noqa: F401  (tok: a fixture)

JUDGE_NAME = "tiny-judge"
# Short rubrics: the test tokenizer spells English mostly byte by byte.
SHORT = {"pointwise_rubric": "Score 1-10. JSON.", "pairwise_rubric": "A or B? JSON.", "reason_max_chars": 12,
         "max_tokens": 48, "temperature": 1.0}
ITEMS = [{"id": f"q{i}", "question": q, "answer": a, "answer_b": b, "reference": "x + 1"}
         for i, (q, a, b) in enumerate([("f(1)?", "2", "3"), ("f(x)?", "x + 1", "x"), ("g?", "no", "yes")])]
ONE_ANSWER = [{k: v for k, v in it.items() if k != "answer_b"} for it in ITEMS]  # nothing to compare


@pytest.fixture(scope="module")
def judge_model(tok) -> LlamaForCausalLM:  # noqa: F811
    """A random tiny Llama with a long context (the judge prompts are ~200 tokens)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def judge_server(judge_model, tok) -> Iterator[Live]:  # noqa: F811
    """genforge serve (in process, real uvicorn on a real port) as the judge endpoint."""
    from genforge.serve.server import create_app

    with serve_in_thread(create_app(model=judge_model, tokenizer=tok, served_model_name=JUDGE_NAME)) as live:
        yield live


def config(live: Live, tmp_path, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": live.v1, "model": JUDGE_NAME, "repeats": 1, "concurrency": 2,
                          "cache_path": tmp_path / "cache.sqlite", **SHORT, **kw})


def chat_calls(live: Live, settle_s: float = 2.0) -> float:
    """Chat requests the server counted. It counts one after its response is sent, so a client that
    just got its last answer may read the metric a moment early: wait until the count holds still."""
    value = live.metric("genforge:http_requests_total", endpoint="/v1/chat/completions")
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = live.metric("genforge:http_requests_total", endpoint="/v1/chat/completions")
        if again == value:
            return value
        value = again
    return value


# ---------------------------------------------------------------- parsing (no server)


def test_parse_repairs_text_around_the_json_and_rejects_out_of_rubric_scores():
    assert parse_judgment('{"score": 7, "reason": "ok"}', "pointwise") == ({"score": 7, "reason": "ok"}, False)
    wrapped = 'Sure! ```json\n{"score": 7.0, "reason": "fine {really}"}\n``` hope it helps {"score": 1}'
    assert parse_judgment(wrapped, "pointwise") == ({"score": 7, "reason": "fine {really}"}, True)
    assert parse_judgment('{"winner": "b", "reason": ""}', "pairwise") == ({"winner": "B", "reason": ""}, False)
    assert first_json_object("[1, 2] {bad} {\"a\": {\"b\": 1}}") == {"a": {"b": 1}}
    with pytest.raises(OutOfRubric, match="11 is outside the rubric's 1-10"):
        parse_judgment('{"score": 11, "reason": "x"}', "pointwise")
    with pytest.raises(OutOfRubric):
        parse_judgment('{"score": 0, "reason": "x"}', "pointwise")
    for bad in ("no json here", '{"score": "7", "reason": "x"}', '{"score": true, "reason": "x"}',
                '{"score": 7.5, "reason": "x"}', '{"score": 7}', '{"winner": "C", "reason": "x"}'):
        kind = "pairwise" if "winner" in bad else "pointwise"
        with pytest.raises(InvalidJudgment):
            parse_judgment(bad, kind)


# ---------------------------------------------------------------- against genforge serve


def test_valid_judgments_with_response_format_then_a_rerun_is_served_from_the_cache(judge_server, tmp_path):
    cfg = config(judge_server, tmp_path, repeats=2)
    before = chat_calls(judge_server)
    summary = judge_items(ITEMS, cfg, tmp_path / "out", mode="both")
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    # 3 items x 2 repeats x (2 pointwise sides + 2 pairwise orders)
    assert len(rows) == 24 and all(r["ok"] and not r["cached"] for r in rows)
    assert all(1 <= r["score"] <= 10 and r["attempts"] == 1 for r in rows if r["kind"] == "pointwise")
    assert {r["winner"] for r in rows if r["kind"] == "pairwise"} <= {"A", "B", "tie"}
    # The judge was asked once per judgment: the schema made every first answer valid.
    assert chat_calls(judge_server) - before == 24 == summary["http_calls"]
    # The both-order rule, checked against the raw rows.
    for item in ITEMS:
        for r in range(2):
            ab, ba = (next(x for x in rows if x["id"] == item["id"] and x["repeat"] == r and x.get("order") == o)
                      for o in ("AB", "BA"))
            assert ba["preferred"] == {"A": "B", "B": "A", "tie": "tie"}[ba["winner"]]
    pair = summary["pairwise"]
    assert 0 <= pair["position_consistency"] <= 1
    assert pair["both_orders"]["wins_a"] + pair["both_orders"]["wins_b"] + pair["both_orders"]["ties"] == 3
    assert summary["pointwise"]["items_scored"] == 3 and summary["pointwise"]["mean_std"] >= 0

    again = judge_items(ITEMS, cfg, tmp_path / "out", mode="both")
    assert chat_calls(judge_server) - before == 24  # the server saw no new request
    assert again["http_calls"] == 0 and again["pairwise"] == {**pair, "cached": 12}
    assert again["pointwise"]["mean_score"] == summary["pointwise"]["mean_score"]


def test_a_judge_answering_without_the_schema_is_retried_then_reported_as_a_failure(judge_server, tmp_path):
    cfg = config(judge_server, tmp_path, response_format="none", attempts=2)
    before = chat_calls(judge_server)
    summary = judge_items(ONE_ANSWER[:2], cfg, tmp_path / "out", mode="pointwise")
    s = summary["pointwise"]
    # A random model writes no JSON judgment: every attempt is invalid, every judgment fails.
    assert s["failed"] == 2 and s["items_scored"] == 0 and s["invalid_answers"] == 4
    assert chat_calls(judge_server) - before == 4
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert all(not r["ok"] and r["attempts"] == 2 and r["error"] and r["raw"] is not None for r in rows)


def test_an_out_of_rubric_score_is_rejected_not_clipped(judge_server, tmp_path):
    # Test-only: the schema sent lets the judge answer 0-99 while the rubric stays 1-10.
    cfg = config(judge_server, tmp_path, schema_score_range=(0, 99), attempts=3, repeats=3)
    judge = Judge(cfg)
    try:
        outcomes = [judge.pointwise(it["question"], it["answer"], repeat=r) for it in ITEMS for r in range(3)]
    finally:
        judge.close()
    assert sum(o["out_of_rubric"] for o in outcomes) > 0
    for o in outcomes:
        if o["ok"]:  # an accepted score is the judge's own, within the rubric
            assert 1 <= o["score"] <= 10 and json.loads(o["raw"])["score"] == o["score"]
        else:  # three answers out of the rubric: a failure that says why
            assert o["out_of_rubric"] == 3 and "outside the rubric's 1-10" in o["error"]
    # Nothing in range at all: every judgment fails, none is clipped to 10.
    never = Judge(config(judge_server, tmp_path, schema_score_range=(11, 99), attempts=2, cache_path=None))
    try:
        o = never.pointwise("q?", "a")
    finally:
        never.close()
    assert not o["ok"] and o["out_of_rubric"] == 2 and "score" not in o


def test_a_judge_model_that_does_not_exist_names_the_models_served(judge_server, tmp_path):
    with pytest.raises(JudgeError, match=rf"no model 'gpt-judge'; it serves '{JUDGE_NAME}'"):
        judge_items(ITEMS[:1], config(judge_server, tmp_path, model="gpt-judge"), tmp_path / "out")


def test_a_timeout_is_retried_with_backoff_then_a_clear_error(judge_server, tmp_path):
    cfg = config(judge_server, tmp_path, timeout=0.005, retries=2, backoff=0.01, max_tokens=400,
                 reason_max_chars=None)
    with pytest.raises(JudgeUnreachableError, match=r"did not answer after 3 tries: every call timed out after "
                                                    r"0.005 s.*0 of 2 judgments were made"):
        judge_items(ITEMS[:1], cfg, tmp_path / "out")


def test_an_unreachable_judge_keeps_the_judgments_made_so_far(judge_model, tok, tmp_path):  # noqa: F811
    from genforge.serve.server import create_app

    with serve_in_thread(create_app(model=judge_model, tokenizer=tok, served_model_name=JUDGE_NAME)) as live:
        cfg = config(live, tmp_path, retries=1, backoff=0.01)
        judge_items(ONE_ANSWER[:2], cfg, tmp_path / "out")  # two items judged (and cached)
    # The judge went away (the server is stopped, its port closed): the suite of three is rerun.
    with pytest.raises(JudgeUnreachableError, match=r"did not answer after 2 tries: cannot connect.*"
                                                    r"2 of 3 judgments were made"):
        judge_items(ONE_ANSWER, cfg, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert [(r["id"], r["ok"], r["cached"]) for r in rows] == [("q0", True, True), ("q1", True, True)]
    assert not (tmp_path / "out" / "judge.json").exists()  # the first run's summary no longer describes them


def test_genforge_eval_judges_a_suites_saved_answers_and_exits_2_when_the_judge_is_gone(judge_server, tmp_path,
                                                                                        capsys):
    from genforge.cli import main

    suite = tmp_path / "qa.jsonl"
    suite.write_text("".join(json.dumps({"prompt": it["question"], "reference": it["reference"],
                                         "labels": {"score": "5"}}) + "\n" for it in ITEMS))
    results = tmp_path / "out" / "qa"
    results.mkdir(parents=True)
    (results / "results.jsonl").write_text("".join(json.dumps(
        {"index": i, "prompt": it["question"], "reference": it["reference"], "labels": {"score": "5"},
         "output": it["answer"]}) + "\n" for i, it in enumerate(ITEMS)))
    args = ["eval", str(tmp_path), "--suite", str(suite), "--out", str(tmp_path / "out"), "--judge-only",
            "--judge-model", JUDGE_NAME, "--judge-repeats", "2", "--judge-max-tokens", "300"]
    assert main([*args, "--judge-url", judge_server.v1]) == 0
    summary = json.loads((results / "judge.json").read_text())
    assert summary["mode"] == "pointwise" and summary["pointwise"]["items_scored"] == 3
    assert summary["pointwise"]["labelled"] == 3  # labels.score "5" read as a human score
    assert "Pointwise (" in (results / "judge.md").read_text()
    assert (tmp_path / "out" / "judge_cache.sqlite").is_file()  # beside the suite's folder, not in it

    capsys.readouterr()
    dead = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
    assert main([*args, "--judge-url", dead, "--judge-retries", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # not the bar
    assert len(err) == 1 and err[0].startswith("error: the judge at http://127.0.0.1:9/v1 did not answer after 2 "
                                               "tries: cannot connect")


def test_the_rubric_goes_to_the_system_turn_or_heads_the_user_turn():
    from genforge.eval.judge import pairwise_messages

    with_system = pairwise_messages("R", "Q", "a", "b", "ref")
    assert [m["role"] for m in with_system] == ["system", "user"] and with_system[0]["content"] == "R"
    assert with_system[1]["content"] == "Question:\nQ\n\nReference answer:\nref\n\nAnswer A:\na\n\nAnswer B:\nb"
    inline = pairwise_messages("R", "Q", "a", "b", None, system=False)
    assert inline == [{"role": "user", "content": "R\n\nQuestion:\nQ\n\nAnswer A:\na\n\nAnswer B:\nb"}]
