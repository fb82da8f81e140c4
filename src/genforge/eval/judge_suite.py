"""Judging a suite's answers: pointwise scores, pairwise A/B in both orders, and (for answers made
with --rag) faithfulness to the sources the prompt held, over repeats.

An item is {"id", "question", "answer", optional "answer_b" (the compared run's answer),
"reference", "labels"}. Pointwise: each answer scored `repeats` times; an item's score is the mean,
its spread the std and range over repeats. Pairwise: each repeat asks A-then-B and B-then-A; the
repeat's decision is a win only when both orders name the same answer, else a tie; the item's
decision is the majority over repeats (a tie when none). Position consistency is the share of
(item, repeat) pairs whose decision survives the swap; the same figures from the first order alone
show what judging in both orders changes. Cohen's kappa against the items' human labels
(labels.score, labels.preferred = "A" / "B" / "tie") when the suite has them. Faithfulness: the
judge lists an answer's claims and marks each supported by the sources or not; an item's figure is
supported / claims (mean over repeats), an answer with no claim counts apart.

Results go to `<out_dir>/judgments.jsonl` (every judgment) and `<out_dir>/judge.json` (summary);
when the judge becomes unreachable the judgments made so far are still written (and cached), and
the error says so.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from genforge.common.errors import GenforgeError
from genforge.common.progress import progress_bar
from genforge.common.runs import RunDir, atomic_write_text, update_report
from genforge.eval.judge import Judge, JudgeConfig

MODES = ("pointwise", "pairwise", "both", "faithfulness")
SWAP = {"A": "B", "B": "A", "tie": "tie"}


@dataclass(frozen=True)
class Task:
    kind: str  # pointwise | pairwise | faithfulness
    item: int  # index into the items
    repeat: int
    side: str = "a"  # pointwise, faithfulness: which answer ("a" the run's, "b" the compared run's)
    order: str | None = None  # pairwise: "AB" (the run's answer shown first) or "BA"


def plan(items: list[dict], mode: str, repeats: int) -> list[Task]:
    """Every judgment to ask, repeat-major so an interrupted run has every item at least once.
    Answers given sources (--rag) are also judged for faithfulness in every mode."""
    pairwise = mode in ("pairwise", "both")
    pointwise = mode in ("pointwise", "both")
    tasks = []
    for r in range(repeats):
        for i, item in enumerate(items):
            for side in ("a", "b"):
                if item.get(f"sources_{side}"):
                    tasks.append(Task("faithfulness", i, r, side=side))
            if pointwise:
                tasks.append(Task("pointwise", i, r, side="a"))
                if item.get("answer_b") is not None:
                    tasks.append(Task("pointwise", i, r, side="b"))
            if pairwise and item.get("answer_b") is not None:
                tasks += [Task("pairwise", i, r, order="AB"), Task("pairwise", i, r, order="BA")]
    return tasks


def ask(judge: Judge, item: dict, task: Task) -> dict:
    """One judgment as a result row; a pairwise winner is mapped back to the items' A/B."""
    q, ref = item["question"], item.get("reference")
    row = {"id": item["id"], "kind": task.kind, "repeat": task.repeat}
    if task.kind == "faithfulness":
        answer = item["answer"] if task.side == "a" else item["answer_b"]
        return {**row, "side": task.side, **judge.faithfulness(q, answer, item[f"sources_{task.side}"],
                                                               repeat=task.repeat)}
    if task.kind == "pointwise":
        answer = item["answer"] if task.side == "a" else item["answer_b"]
        return {**row, "side": task.side, **judge.pointwise(q, answer, ref, repeat=task.repeat)}
    a, b = item["answer"], item["answer_b"]
    first, second = (a, b) if task.order == "AB" else (b, a)
    out = judge.pairwise(q, first, second, ref, repeat=task.repeat, order=task.order)
    if out.get("ok"):
        out["preferred"] = out["winner"] if task.order == "AB" else SWAP[out["winner"]]
    return {**row, "order": task.order, **out}


def run_tasks(judge: Judge, items: list[dict], tasks: list[Task]) -> tuple[list[dict], GenforgeError | None]:
    """All judgments with bounded concurrency, in plan order; on a judge error (the first stops the
    rest), the judgments done so far and the error."""
    rows: dict[int, dict] = {}
    error: GenforgeError | None = None
    with progress_bar() as bar, ThreadPoolExecutor(judge.config.concurrency) as pool:
        task_bar = bar.add_task("judging", total=len(tasks), info="")
        futures = {pool.submit(ask, judge, items[t.item], t): n for n, t in enumerate(tasks)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                if f.cancelled():
                    continue
                if isinstance(f.exception(), GenforgeError):
                    error = error or f.exception()
                    continue
                rows[futures[f]] = f.result()  # any other exception is a bug: let it raise
                bar.update(task_bar, advance=1, info=f"{judge.http_calls} calls")
            if error is not None:
                for f in pending:
                    f.cancel()
                pending = {f for f in pending if not f.cancelled()}
    return [rows[n] for n in sorted(rows)], error


# ---------------------------------------------------------------- aggregation


def majority(decisions: list[str]) -> str:
    """The most frequent decision; "tie" when two share the top count (or there are none)."""
    counts = Counter(decisions).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return "tie"
    return counts[0][0]


def kappa(labels: list, predictions: list, weights: str | None = None) -> float | None:
    """Cohen's kappa (sklearn); None when there are no pairs or only one category overall."""
    if not labels or len(set(labels) | set(predictions)) < 2:
        return None
    from sklearn.metrics import cohen_kappa_score

    value = float(cohen_kappa_score(labels, predictions, weights=weights))
    return None if value != value else value  # nan when one side is constant


def _failures(rows: list[dict]) -> dict:
    return {"judgments": len(rows), "failed": sum(not r["ok"] for r in rows),
            "invalid_answers": sum(r["invalid"] for r in rows),
            "out_of_rubric": sum(r["out_of_rubric"] for r in rows),
            "repaired": sum(bool(r.get("repaired")) for r in rows if r["ok"]),
            "cached": sum(bool(r.get("cached")) for r in rows)}


def summarize_pointwise(items: list[dict], rows: list[dict], side: str = "a") -> tuple[dict, dict]:
    """({id: {scores, mean, std, range}}, summary) for one side's pointwise judgments."""
    rows = [r for r in rows if r["kind"] == "pointwise" and r["side"] == side]
    per_item = {}
    for item in items:
        scores = [r["score"] for r in rows if r["id"] == item["id"] and r["ok"]]
        if scores:
            per_item[item["id"]] = {"scores": scores, "mean": statistics.fmean(scores),
                                    "std": statistics.pstdev(scores), "range": max(scores) - min(scores)}
    scored = list(per_item.values())
    labelled = [(label, round(per_item[it["id"]]["mean"])) for it in items
                if it["id"] in per_item and (label := _score_label(it)) is not None]
    summary = {"items": len(items), "items_scored": len(scored),
               "mean_score": statistics.fmean(s["mean"] for s in scored) if scored else None,
               "mean_std": statistics.fmean(s["std"] for s in scored) if scored else None,
               "mean_range": statistics.fmean(s["range"] for s in scored) if scored else None,
               "max_range": max((s["range"] for s in scored), default=None),
               "labelled": len(labelled),
               "kappa_quadratic": kappa([a for a, _ in labelled], [b for _, b in labelled], weights="quadratic"),
               **_failures(rows)}
    return per_item, summary


def summarize_faithfulness(items: list[dict], rows: list[dict], side: str = "a") -> tuple[dict, dict]:
    """({id: {per repeat, mean, std}}, summary) for one side's faithfulness judgments. An item's
    faithfulness is the mean over the repeats whose judgment found claims; the summary gives the mean
    over items (macro) and supported claims / claims over every judgment (micro)."""
    rows = [r for r in rows if r["kind"] == "faithfulness" and r["side"] == side]
    ok = [r for r in rows if r["ok"]]
    per_item = {}
    for item in items:
        values = [r["faithfulness"] for r in ok if r["id"] == item["id"] and r["faithfulness"] is not None]
        if values:
            per_item[item["id"]] = {"values": values, "mean": statistics.fmean(values),
                                    "std": statistics.pstdev(values)}
    claims = sum(r["total"] for r in ok)
    judged = {r["id"] for r in ok}
    summary = {"items_with_sources": sum(bool(it.get(f"sources_{side}")) for it in items),
               "items_judged": len(judged), "items_with_claims": len(per_item),
               "items_without_claims": len(judged - per_item.keys()),
               "faithfulness": statistics.fmean(v["mean"] for v in per_item.values()) if per_item else None,
               "supported_claims": sum(r["supported"] for r in ok), "claims": claims,
               "faithfulness_micro": sum(r["supported"] for r in ok) / claims if claims else None,
               "claims_per_answer": claims / len(ok) if ok else None,
               "mean_std": statistics.fmean(v["std"] for v in per_item.values()) if per_item else None,
               **_failures(rows)}
    return per_item, summary


def _score_label(item: dict) -> int | None:
    """labels.score as an integer (suite labels are strings: "7"), None when absent or not a number."""
    value = (item.get("labels") or {}).get("score")
    try:
        return None if value is None or isinstance(value, bool) else round(float(value))
    except (TypeError, ValueError):
        return None


def _decisions(items: list[dict], per_item: dict, key: str) -> tuple[dict, float | None]:
    counts = Counter(v[key] for v in per_item.values())
    labelled = [(it["labels"]["preferred"], per_item[it["id"]][key]) for it in items
                if it["id"] in per_item and (it.get("labels") or {}).get("preferred") in SWAP]
    n = len(per_item)
    return ({"wins_a": counts["A"], "wins_b": counts["B"], "ties": counts["tie"],
             "win_rate_a": (counts["A"] + counts["tie"] / 2) / n if n else None,
             "kappa": kappa([a for a, _ in labelled], [b for _, b in labelled]),
             "agreement": sum(a == b for a, b in labelled) / len(labelled) if labelled else None},
            len(labelled))


def summarize_pairwise(items: list[dict], rows: list[dict]) -> tuple[dict, dict]:
    """({id: {decision, one_order, repeats: [...]}}, summary): both-order vs first-order-only."""
    rows = [r for r in rows if r["kind"] == "pairwise"]
    by = {(r["id"], r["repeat"], r["order"]): r for r in rows if r["ok"]}
    per_item, consistent, decisive, decisive_kept = {}, [], 0, 0
    for item in items:
        repeats = sorted({r for (i, r, _) in by if i == item["id"]})
        both, first_only, kept = [], [], []
        for r in repeats:
            ab, ba = by.get((item["id"], r, "AB")), by.get((item["id"], r, "BA"))
            if ab:
                first_only.append(ab["preferred"])
            if ab and ba:
                same = ab["preferred"] == ba["preferred"]
                both.append(ab["preferred"] if same else "tie")
                kept.append(same)
                if ab["preferred"] != "tie":
                    decisive += 1
                    decisive_kept += same
        if first_only:
            per_item[item["id"]] = {"decision": majority(both) if both else None, "one_order": majority(first_only),
                                    "repeat_decisions": both, "consistent": kept}
            consistent += kept
    judged_both = {k: v for k, v in per_item.items() if v["decision"] is not None}
    both_stats, labelled = _decisions(items, judged_both, "decision")
    one_stats, _ = _decisions(items, per_item, "one_order")
    summary = {"items": len(items), "items_judged": len(judged_both), "labelled": labelled,
               "position_consistency": sum(consistent) / len(consistent) if consistent else None,
               "decisive_kept_on_swap": decisive_kept / decisive if decisive else None,
               "both_orders": both_stats, "one_order": one_stats, **_failures(rows)}
    return per_item, summary


# ---------------------------------------------------------------- the whole thing


def judge_items(items: list[dict], config: JudgeConfig, out_dir: str | Path, mode: str = "pointwise") -> dict:
    """Judge `items`, write judgments.jsonl and judge.json under `out_dir`, return the summary.

    Raises the judge's error (after writing the judgments made so far) when it becomes unusable.
    """
    out_dir = Path(out_dir)
    if mode not in MODES:
        raise GenforgeError(f"judge mode {mode!r} is not one of {', '.join(MODES)}")
    if mode in ("pairwise", "both") and not any(it.get("answer_b") is not None for it in items):
        raise GenforgeError("pairwise judging needs a second answer per item: give --compare OTHER_RUN")
    if mode == "faithfulness" and not any(it.get("sources_a") or it.get("sources_b") for it in items):
        raise GenforgeError("faithfulness is judged against the sources an answer was given: answer the suite with "
                            "--rag INDEX (and room for sources in the prompt) first")
    if config.cache_path is None:
        config.cache_path = out_dir / "judge_cache.sqlite"
    judge = Judge(config)
    try:
        tasks = plan(items, mode, config.repeats)
        rows, error = run_tasks(judge, items, tasks)
    finally:
        judge.close()
    atomic_write_text(out_dir / "judgments.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if error is not None:
        (out_dir / "judge.json").unlink(missing_ok=True)  # an earlier summary would not match these judgments
        raise type(error)(f"{error.message} ({len(rows)} of {len(tasks)} judgments were made; they are in "
                          f"{out_dir / 'judgments.jsonl'} and cached in {config.cache_path})")
    summary: dict = {"judge": {k: v for k, v in asdict(config).items()
                               if k in ("url", "model", "repeats", "temperature", "max_tokens", "attempts",
                                        "response_format", "score_range", "system_rubric", "pointwise_rubric",
                                        "pairwise_rubric")},
                     "mode": mode, "http_calls": judge.http_calls}
    if mode in ("pointwise", "both"):
        _, summary["pointwise"] = summarize_pointwise(items, rows, "a")
        if any(it.get("answer_b") is not None for it in items):
            _, summary["pointwise_b"] = summarize_pointwise(items, rows, "b")
    if mode in ("pairwise", "both"):
        _, summary["pairwise"] = summarize_pairwise(items, rows)
    for side, key in (("a", "faithfulness"), ("b", "faithfulness_b")):
        if any(it.get(f"sources_{side}") for it in items):
            _, summary[key] = summarize_faithfulness(items, rows, side)
    atomic_write_text(out_dir / "judge.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _fmt(v: object) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def report_markdown(summary: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The report.md section for a judge summary."""
    j = summary["judge"]
    lines = [f"Judge: `{j['model']}` at {j['url']}, {j['repeats']} repeats at temperature {j['temperature']}, "
             f"response_format {j['response_format']}; {summary['http_calls']} HTTP calls (the rest cached).", ""]
    for key, name in (("pointwise", names[0]), ("pointwise_b", names[1])):
        if s := summary.get(key):
            lines += [f"Pointwise ({name}, scores {j['score_range'][0]}-{j['score_range'][1]}): mean "
                      f"{_fmt(s['mean_score'])} over {s['items_scored']}/{s['items']} items; spread over repeats: "
                      f"mean std {_fmt(s['mean_std'])}, mean range {_fmt(s['mean_range'])}; {s['failed']} failed "
                      f"judgments ({s['invalid_answers']} invalid answers, {s['out_of_rubric']} out-of-rubric "
                      f"scores rejected, {s['repaired']} repaired); kappa vs labels {_fmt(s['kappa_quadratic'])} "
                      f"({s['labelled']} labelled).", ""]
    for key, name in (("faithfulness", names[0]), ("faithfulness_b", names[1])):
        if s := summary.get(key):
            lines += [f"Faithfulness ({name}, supported claims / claims against the sources in its prompt): "
                      f"{_fmt(s['faithfulness'])} over {s['items_with_claims']} answers with claims "
                      f"(micro {_fmt(s['faithfulness_micro'])}: {s['supported_claims']}/{s['claims']} claims); "
                      f"{s['items_without_claims']} answers made no claim; {s['items_with_sources']} answers had "
                      f"sources; spread over repeats: mean std {_fmt(s['mean_std'])}; {s['failed']} failed "
                      f"judgments ({s['invalid_answers']} invalid answers).", ""]
    if s := summary.get("pairwise"):
        lines += [f"Pairwise, A = {names[0]}, B = {names[1]}; position consistency {_fmt(s['position_consistency'])}, "
                  f"decisive judgments kept on swap {_fmt(s['decisive_kept_on_swap'])}; {s['failed']} failed.", "",
                  "| decided by | A wins | B wins | ties | A win rate | agreement with labels | kappa |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for key, label in (("both_orders", "both orders"), ("one_order", "A shown first only")):
            d = s[key]
            lines.append(f"| {label} | {d['wins_a']} | {d['wins_b']} | {d['ties']} | {_fmt(d['win_rate_a'])} | "
                         f"{_fmt(d['agreement'])} | {_fmt(d['kappa'])} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- a suite's results, as `genforge eval` wrote them


def question_of(row: dict) -> str:
    """The question a suite row asked: its prompt, or its chat messages as "role: content" lines."""
    if row.get("prompt") is not None:
        return row["prompt"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in row.get("messages") or [])


def items_from_results(results_dir: Path) -> list[dict]:
    """Judge items from results.jsonl (and compared.jsonl, the --compare run's rows) of a suite."""
    def rows(name: str) -> list[dict] | None:
        path = results_dir / name
        if not path.is_file():
            return None
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    a = rows("results.jsonl")
    if a is None:
        raise GenforgeError(f"{results_dir} has no results.jsonl; run `genforge eval RUN --suite FILE` first")
    b = rows("compared.jsonl")
    items = []
    for n, row in enumerate(a):
        item = {"id": str(row.get("index", n)), "question": question_of(row), "answer": row["output"],
                "reference": row.get("reference"), "labels": row.get("labels") or {},
                "sources_a": _prompt_sources(row)}
        if b is not None:
            item["answer_b"], item["sources_b"] = b[n]["output"], _prompt_sources(b[n])
        items.append(item)
    return items


def _prompt_sources(row: dict) -> list[str]:
    """The numbered sources a --rag answer's prompt held, as the prompt showed them ([] without --rag)."""
    return [s["text"] for s in (row.get("rag") or {}).get("sources", []) if s.get("in_prompt")]


def judge_suite_results(results_dir: str | Path, config: JudgeConfig, mode: str | None = None,
                        names: tuple[str, str] = ("run", "compared"),
                        report_run: str | Path | None = None) -> tuple[dict, str]:
    """Judge a suite's answers in place: judgments.jsonl, judge.json and judge.md beside results.jsonl,
    and a "judge SUITE" section in `report_run`'s report.md when given.

    The cache lives one level up (RUN/eval/judge_cache.sqlite), outside the suite's folder, which a
    rerun of the suite replaces whole. Returns (summary, the report section's markdown).
    """
    results_dir = Path(results_dir)
    items = items_from_results(results_dir)
    has_b = any("answer_b" in it for it in items)
    mode = mode or ("both" if has_b else "pointwise")
    if config.cache_path is None:
        config.cache_path = results_dir.parent / "judge_cache.sqlite"
    summary = judge_items(items, config, results_dir, mode=mode)
    markdown = report_markdown(summary, names)
    atomic_write_text(results_dir / "judge.md", markdown + "\n")
    if report_run is not None:
        update_report(RunDir(report_run), f"judge {results_dir.name}", f"## Judge on suite `{results_dir.name}`\n\n{markdown}")
    return summary, markdown
