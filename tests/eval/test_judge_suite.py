"""Aggregation of judgments (eval/judge_suite.py): both-order pairwise decisions, spread, kappa."""

from __future__ import annotations

import pytest
from sklearn.metrics import cohen_kappa_score

from genforge.eval.judge_suite import Task, kappa, majority, plan, summarize_pairwise, summarize_pointwise


def pair_row(item: str, repeat: int, order: str, shown_winner: str) -> dict:
    """A pairwise judgment row as judge_suite.ask makes it: `shown_winner` is what the judge said
    about the answers in the order shown; `preferred` maps it back to the items' A/B."""
    swap = {"A": "B", "B": "A", "tie": "tie"}
    preferred = shown_winner if order == "AB" else swap[shown_winner]
    return {"id": item, "kind": "pairwise", "repeat": repeat, "order": order, "ok": True, "winner": shown_winner,
            "preferred": preferred, "invalid": 0, "out_of_rubric": 0, "repaired": False, "cached": False}


def test_a_pairwise_win_counts_only_when_both_orders_agree():
    items = [{"id": i, "labels": {}} for i in ("agree", "flip", "half")]
    rows = [
        # "agree": the judge prefers the first item's A whichever position it is shown in
        pair_row("agree", 0, "AB", "A"), pair_row("agree", 0, "BA", "B"),
        # "flip": the judge always picks the first position shown: a position bias, not a preference
        pair_row("flip", 0, "AB", "A"), pair_row("flip", 0, "BA", "A"),
        # "half": decisive in one order, a tie in the other
        pair_row("half", 0, "AB", "B"), pair_row("half", 0, "BA", "tie"),
    ]
    per_item, summary = summarize_pairwise(items, rows)
    assert per_item["agree"]["decision"] == "A"
    assert per_item["flip"]["decision"] == "tie"
    assert per_item["half"]["decision"] == "tie"
    assert summary["position_consistency"] == pytest.approx(1 / 3)
    assert summary["decisive_kept_on_swap"] == pytest.approx(1 / 3)  # 3 decisive first orders, 1 kept
    assert summary["both_orders"] | {"kappa": None, "agreement": None} == {
        "wins_a": 1, "wins_b": 0, "ties": 2, "win_rate_a": pytest.approx(2 / 3), "kappa": None, "agreement": None}
    # The first order alone would have called two decisive wins for A and one for B.
    assert (summary["one_order"]["wins_a"], summary["one_order"]["wins_b"], summary["one_order"]["ties"]) == (2, 1, 0)


def test_repeats_are_combined_by_majority_and_a_missing_order_decides_nothing():
    items = [{"id": "x"}, {"id": "y"}]
    rows = [pair_row("x", 0, "AB", "B"), pair_row("x", 0, "BA", "A"),  # B
            pair_row("x", 1, "AB", "B"), pair_row("x", 1, "BA", "A"),  # B
            pair_row("x", 2, "AB", "A"), pair_row("x", 2, "BA", "A"),  # flip -> tie
            pair_row("y", 0, "AB", "A")]  # the swapped order failed: no both-order decision
    rows.append({**pair_row("y", 0, "BA", "A"), "ok": False, "invalid": 3})
    per_item, summary = summarize_pairwise(items, rows)
    assert per_item["x"]["repeat_decisions"] == ["B", "B", "tie"]
    assert per_item["x"]["decision"] == "B"
    assert per_item["y"]["decision"] is None and per_item["y"]["one_order"] == "A"
    assert summary["items_judged"] == 1
    assert summary["failed"] == 1 and summary["invalid_answers"] == 3
    assert majority(["A", "B"]) == "tie" and majority([]) == "tie" and majority(["A", "tie", "A"]) == "A"


def test_kappa_against_human_labels_matches_a_hand_computed_value():
    # labels A B A B, decisions A B B B: observed agreement 0.75, chance 0.5 -> kappa 0.5
    items = [{"id": str(i), "labels": {"preferred": lab}} for i, lab in enumerate("ABAB")]
    decided = "ABBB"
    rows = []
    for i, d in enumerate(decided):
        rows += [pair_row(str(i), 0, "AB", d), pair_row(str(i), 0, "BA", {"A": "B", "B": "A"}[d])]
    _, summary = summarize_pairwise(items, rows)
    assert summary["both_orders"]["kappa"] == pytest.approx(0.5)
    assert summary["both_orders"]["agreement"] == pytest.approx(0.75)
    assert kappa(list("ABAB"), list(decided)) == pytest.approx(cohen_kappa_score(list("ABAB"), list(decided)))
    assert kappa(["A", "A"], ["A", "A"]) is None  # one category: kappa undefined, not a number


def test_pointwise_spread_and_weighted_kappa_with_string_labels():
    items = [{"id": "p", "labels": {"score": "8"}}, {"id": "q", "labels": {"score": "2"}}, {"id": "r"}]

    def row(item, repeat, score, ok=True):
        return {"id": item, "kind": "pointwise", "side": "a", "repeat": repeat, "ok": ok, "score": score,
                "invalid": 0, "out_of_rubric": 0 if ok else 3, "repaired": False, "cached": False}

    rows = [row("p", 0, 7), row("p", 1, 9), row("p", 2, 8), row("q", 0, 2), row("q", 1, 2), row("q", 2, 5),
            row("r", 0, None, ok=False)]
    per_item, summary = summarize_pointwise(items, rows)
    assert per_item["p"] == {"scores": [7, 9, 8], "mean": 8.0, "std": pytest.approx(0.8165, abs=1e-4), "range": 2}
    assert per_item["q"]["mean"] == 3.0 and per_item["q"]["range"] == 3
    assert "r" not in per_item
    assert summary["items_scored"] == 2 and summary["failed"] == 1 and summary["out_of_rubric"] == 3
    assert summary["mean_range"] == 2.5 and summary["max_range"] == 3
    assert summary["labelled"] == 2
    assert summary["kappa_quadratic"] == pytest.approx(cohen_kappa_score([8, 2], [8, 3], weights="quadratic"))


def test_plan_asks_both_orders_and_both_sides_for_every_repeat():
    items = [{"id": "a", "answer_b": "x"}, {"id": "b"}]  # "b" has no second answer: pointwise only
    tasks = plan(items, "both", repeats=2)
    assert Task("pairwise", 0, 1, order="BA") in tasks and Task("pointwise", 0, 1, side="b") in tasks
    assert not any(t.item == 1 and t.kind == "pairwise" for t in tasks)
    assert len(tasks) == 2 * (4 + 1)
    assert [t.repeat for t in tasks] == sorted(t.repeat for t in tasks)  # every item once before repeats
