"""`genforge eval RUN --suite FILE`: answer a suite with one model (or two, `--compare`), write
the per-item rows, the summary and a report section, and return the summary.

    RUN/eval/<suite>/results.jsonl    RUN's answers: prompt, output, reference, labels, metrics
    RUN/eval/<suite>/compared.jsonl   the compared run's answers to the same items (--compare)
    RUN/eval/<suite>/summary.json     both runs' metrics (also per label value), their differences,
                                      the items that differ most
    RUN/eval/<suite>/report.md        the section below, standalone
    RUN/report.md                     a section "suite <name>" (replaced on a rerun)

The folder is written whole and renamed into place, so a failed or interrupted evaluation leaves
the previous results as they were. For a plain HF model folder (not a run), `--out DIR` takes the
place of RUN/eval.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.table import Table

from genforge.common.errors import ConfigError
from genforge.common.runs import RunDir, atomic_dir, update_report
from genforge.eval.rag import RagSettings, SuiteSources, retrieval_lines
from genforge.eval.suite import Settings, answer_suite, load_suite
from genforge.eval.text_metrics import ITEM_METRICS
from genforge.models.lm import model_folder

# (key, label, format); higher is better for all but perplexity
METRICS = (("bleu", "BLEU", "{:.2f}"), ("chrf", "chrF", "{:.2f}"), ("rouge1", "ROUGE-1 F1", "{:.4f}"),
           ("rouge2", "ROUGE-2 F1", "{:.4f}"), ("rougeL", "ROUGE-L F1", "{:.4f}"),
           ("exact_match", "exact match", "{:.3f}"), ("reference_perplexity", "reference perplexity (lower is better)",
                                                      "{:.3f}"))
DIFF_KEY = "chrf"  # what "the items that differ most" are ranked by: chrF is graded even for short answers
TOP_DIFFERING = 5


def _fmt(fmt: str, value: float | None) -> str:
    return "-" if value is None else fmt.format(value)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _destination(run: str, out: str | None) -> tuple[Path, RunDir | None]:
    """The folder the suite's results go in (its parent), and the run whose report gets a section."""
    path = Path(run)
    model_folder(path)  # a clear error now for a missing model, before any work
    if (path / "recipe.yaml").is_file():
        return (Path(out) if out else path / "eval"), (None if out else RunDir(path))
    if out is None:
        raise ConfigError(f"{run} is a model folder, not a genforge run: there is no run directory to keep the "
                          "results in; pass --out DIR", param="out")
    return Path(out), None


def differing_items(a_rows: list[dict], b_rows: list[dict], top: int = TOP_DIFFERING) -> list[dict]:
    """The items whose answers score most differently (|chrF A - chrF B|, then ROUGE-L), largest first."""
    def gap(i: int) -> tuple[float, float]:
        a, b = a_rows[i]["metrics"], b_rows[i]["metrics"]
        return abs(a[DIFF_KEY] - b[DIFF_KEY]), abs(a["rougeL"] - b["rougeL"])

    ranked = sorted((i for i in range(len(a_rows)) if gap(i) != (0.0, 0.0)), key=lambda i: (gap(i), -i), reverse=True)
    return [{"index": i, "prompt": a_rows[i].get("prompt") or a_rows[i]["messages"][-1]["content"],
             "reference": a_rows[i]["reference"], "output_a": a_rows[i]["output"], "output_b": b_rows[i]["output"],
             f"{DIFF_KEY}_a": a_rows[i]["metrics"][DIFF_KEY], f"{DIFF_KEY}_b": b_rows[i]["metrics"][DIFF_KEY]}
            for i in ranked[:top]]


def by_label(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Mean per-item scores for each value of each label: {label: {value: {"items", metric: mean}}}."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        for key, value in r["labels"].items():
            groups.setdefault(key, {}).setdefault(value, []).append(r["metrics"])
    return {key: {value: {"items": len(ms), **{k: sum(m[k] for m in ms) / len(ms) for k in ITEM_METRICS}}
                  for value, ms in sorted(values.items())} for key, values in sorted(groups.items())}


def summarize(name: str, source: str, settings: Settings, a: dict, b: dict | None) -> dict:
    def side(r: dict) -> dict:
        return {**{k: r[k] for k in ("model", "context_length", "metrics", "counts", "seconds", "retrieval")
                   if k in r}, "by_label": by_label(r["rows"])}

    summary = {"suite": name, "source": source, "items": a["counts"]["items"], "settings": vars(settings),
               "run": side(a)}
    if b is not None:
        summary["compared"] = side(b)
        summary["difference"] = {k: a["metrics"][k] - b["metrics"][k] for k in a["metrics"] if k in b["metrics"]}
        summary["differing_items"] = differing_items(a["rows"], b["rows"])
    return summary


def summary_table(summary: dict) -> Table:
    """The printed table: metric and value, or metric, run A, run B, difference (A - B)."""
    b = summary.get("compared")
    caption = f"A: {summary['run']['model']}\nB: {b['model']}" if b else None
    table = Table(title=f"suite {summary['suite']}: {summary['items']} items", caption=caption)
    table.add_column("metric")
    table.add_column("A" if b else "value", justify="right")
    if b:
        table.add_column("B", justify="right")
        table.add_column("A - B", justify="right")
    for key, label, fmt in METRICS:
        row = [label, _fmt(fmt, summary["run"]["metrics"].get(key))]
        if b:
            row += [_fmt(fmt, b["metrics"].get(key)), _fmt("{:+" + fmt[2:], summary["difference"].get(key))]
        table.add_row(*row)
    k = summary["run"].get("retrieval", {}).get("k")
    for key, label in (("hit@1", "retrieval hit@1"), (f"hit@{k}", f"retrieval hit@{k}"),
                       ("hit_in_prompt", "relevant source in prompt"), ("mean_sources_in_prompt", "sources per prompt")):
        if key in summary["run"].get("retrieval", {}):
            row = [label, f"{summary['run']['retrieval'][key]:.3f}"]
            if b:
                other = b["retrieval"][key]
                row += [f"{other:.3f}", f"{summary['run']['retrieval'][key] - other:+.3f}"]
            table.add_row(*row)
    return table


def report_section(summary: dict, results_dir: str) -> str:
    a, b = summary["run"], summary.get("compared")
    s = summary["settings"]
    how = Settings(**s).describe()
    lines = [f"## Suite `{summary['suite']}`", "",
             f"{summary['items']} items from `{summary['source']}`, answered {how}; per-item rows in "
             f"`{results_dir}/results.jsonl`" + (f" and, for the compared run, `{results_dir}/compared.jsonl`." if b
                                                 else "."), ""]
    if b:
        lines += [f"Compared with `{b['model']}` (B) on the same items; A is `{a['model']}`.", "",
                  "| metric | A | B | difference (A - B) |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | {_fmt(fmt, a['metrics'].get(k))} | {_fmt(fmt, b['metrics'].get(k))} | "
                  f"{_fmt('{:+' + fmt[2:], summary['difference'].get(k))} |" for k, label, fmt in METRICS]
    else:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {label} | {_fmt(fmt, a['metrics'].get(k))} |" for k, label, fmt in METRICS]
    for side, r in (("A: ", a), ("B: ", b)) if b else (("", a),):
        if "retrieval" in r:
            lines += [""] + retrieval_lines(side, r["retrieval"])
    lines += ["", "BLEU and chrF (sacrebleu, 0-100) pool the n-grams of every item; ROUGE F1 (rouge-score, no "
              "stemming) and exact match (after whitespace normalisation) are means over items. Reference "
              "perplexity: exp of the reference tokens' mean loss given the prompt, over every scored token."]
    for side, r in (("A", a), ("B", b)) if b else (("", a),):
        c = r["counts"]
        skipped = c["perplexity_skipped_prompt_fills_context"] + c["perplexity_skipped_empty_reference"]
        notes = [_count(c["not_generated_prompt_fills_context"], "prompt fills", "prompts fill")
                 + " the context (answer left empty)",
                 _count(skipped, "item has", "items have") + " no reference perplexity (the prompt fills the context "
                 "or the reference is empty)",
                 _count(c["perplexity_reference_truncated"], "reference is", "references are")
                 + " scored only on the tokens that fit the context"]
        notes = [n for n in notes if not n.startswith("0 ")]
        if any(notes):
            lines += ["", f"{side + ': ' if side else ''}" + "; ".join(notes) + "."]
    lines += label_table(a, b)
    if b:
        lines += ["", "### Items that differ most (by chrF)", ""]
        if not summary["differing_items"]:
            lines.append("None: both runs scored every item alike.")
        for d in summary["differing_items"]:
            lines += [f"- item {d['index']}: {d['prompt'][:160]!r}",
                      f"  - A (chrF {d['chrf_a']:.1f}): {d['output_a'][:240]!r}",
                      f"  - B (chrF {d['chrf_b']:.1f}): {d['output_b'][:240]!r}",
                      f"  - reference: {d['reference'][:240]!r}"]
    return "\n".join(lines) + "\n"


def label_table(a: dict, b: dict | None, max_values: int = 8) -> list[str]:
    """Markdown lines: mean chrF and ROUGE-L per value of each label with 2..max_values values
    (a label on every item alike, or one per item, says nothing as a table)."""
    keys = [k for k, values in a["by_label"].items() if 2 <= len(values) <= max_values]
    if not keys:
        return []
    head = "| label | items | chrF A | chrF B | ROUGE-L A | ROUGE-L B |" if b else "| label | items | chrF | ROUGE-L |"
    lines = ["", "### By label", "", head, "|---|---:|" + "---:|" * (4 if b else 2)]
    for key in keys:
        for value, m in a["by_label"][key].items():
            other = b["by_label"][key][value] if b else None
            cells = [f"{m['chrf']:.2f}"] + ([f"{other['chrf']:.2f}"] if b else []) + [f"{m['rougeL']:.4f}"] + (
                [f"{other['rougeL']:.4f}"] if b else [])
            lines.append(f"| {key} = {value} | {m['items']} | " + " | ".join(cells) + " |")
    return lines


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def evaluate_suite(run: str, suite: str, *, compare: str | None = None, out: str | None = None,
                   settings: Settings | None = None, rag: RagSettings | None = None) -> dict:
    """Answer `suite` with RUN (and with `compare`), score, write the results; the summary.
    With `rag`, every prompt carries the sources retrieved from the index, and the results go to
    `<suite>-rag-<index>`, beside the plain answers rather than over them."""
    settings = settings or Settings()
    settings.sampling(0).validate()  # a bad temperature / top-p fails before any model loads
    name, items = load_suite(suite)  # bad suites fail before any model loads
    parent, run_dir = _destination(run, out)
    if compare is not None:
        model_folder(compare)
    sources = None
    if rag is not None:
        sources = SuiteSources(rag, items)
        name = f"{name}-rag-{re.sub(r'[^A-Za-z0-9._-]+', '-', rag.index)}"
    a = answer_suite(run, items, settings, "A" if compare else "run", sources)
    b = answer_suite(compare, items, settings, "B", sources) if compare is not None else None
    summary = summarize(name, str(suite), settings, a, b)
    results_dir = parent / name
    shown = f"eval/{name}" if run_dir is not None else str(results_dir)
    section = report_section(summary, shown)
    with atomic_dir(results_dir) as tmp:
        (tmp / "results.jsonl").write_text(_jsonl(a["rows"]), encoding="utf-8")
        if b is not None:
            (tmp / "compared.jsonl").write_text(_jsonl(b["rows"]), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        (tmp / "report.md").write_text(section, encoding="utf-8")
    if run_dir is not None:
        update_report(run_dir, f"suite {name}", section)
    summary["results_dir"] = str(results_dir)
    return summary

