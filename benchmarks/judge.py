"""LLM-as-a-judge on a labelled pairwise set: agreement with the labels and position consistency,
one order vs both orders.

    .venv/bin/python benchmarks/judge.py [--runs runs] [--repeats 3]
    .venv/bin/python benchmarks/judge.py --judge-url URL --judge-model NAME   # any other judge

The set (written by genforge): the 36 held-out questions of `genforge demo --finetune`
(runs/demo-finetune/answers.json; built with `genforge demo --finetune` when absent), each with the
answer of the pretrained demo model (the weak run) and of the SFT model (the strong run, same base,
150 SFT steps), shown as A or B by a seeded coin per item so that "always A" scores nothing.
The labels are human-style but not human: an answer is preferred when its ROUGE-L F1 against the
topic's reference paragraph beats the other's by at least --tie-margin, else "tie". Both label
and judge see the same text: the answers cut to what fits the judge's context.

The judge, unless --judge-url names another: `genforge serve runs/demo-finetune/sft/model`, the best
model this machine has, and it is small: a 4M-parameter Llama with a 128-token context, trained on
the CPython docs, asked in a JSON schema (response_format json_schema, so its answer is always a
valid judgment). With 128 tokens the prompt holds no reference and ~25 tokens of each answer. It is
also the strong contestant, so a self-preference bias would show as a lean to the SFT answer. The
benchmark measures the machinery (both orders, repeats, kappa, consistency) on a real served judge;
the judge's own quality is what such a model can give, which is expected to be near chance.

Rows: decided by the first order only (A shown first), and by both orders (a win only when the
two orders agree). Writes benchmarks/results/judge.json and prints a markdown table. Touches
/tmp/QUIET while it runs (the shared machine's "benchmark running" flag).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, free_port, git_commit, md_table, stop_server, versions, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUIET = Path("/tmp/QUIET")
JUDGE_NAME = "sft-judge"
RUBRIC = "Which answer is better, A or B? JSON."  # every token counts in a 128-token context


def genforge_cmd() -> list[str]:
    script = Path(sys.executable).parent / "genforge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "genforge.cli"]


def ensure_answers(runs: Path) -> Path:
    """runs/demo-finetune/answers.json, made by `genforge demo --finetune` (and `genforge demo` first)."""
    answers = runs / "demo-finetune" / "answers.json"
    if not answers.is_file():
        if not (runs / "demo" / "model" / "config.json").is_file():
            subprocess.run([*genforge_cmd(), "demo"], cwd=runs.parent, check=True)
        subprocess.run([*genforge_cmd(), "demo", "--finetune"], cwd=runs.parent, check=True)
    return answers


def fit_answers(tokenizer, question: str, a: str, b: str, budget: int) -> tuple[str, str]:
    """Both answers cut to the same token count, the largest at which the chat prompt fits `budget`."""
    from genforge.eval.judge import pairwise_messages

    ids_a, ids_b = tokenizer.encode(a, add_special_tokens=False), tokenizer.encode(b, add_special_tokens=False)
    for n in range(max(len(ids_a), len(ids_b)), 0, -1):
        ca, cb = tokenizer.decode(ids_a[:n]), tokenizer.decode(ids_b[:n])
        messages = pairwise_messages(RUBRIC, question, ca, cb, None, system=False)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if len(tokenizer(text)["input_ids"]) + 2 <= budget:  # 2: room for a BOS the server may add
            return ca, cb
    raise SystemExit(f"the question {question!r} alone does not fit the judge's {budget}-token prompt budget")


def build_items(answers_path: Path, tokenizer, budget: int, tie_margin: float, seed: int) -> list[dict]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    data = json.loads(answers_path.read_text())
    coin = random.Random(seed)
    items = []
    for i, (weak, strong) in enumerate(zip(data["pretrained"], data["sft"], strict=True)):
        assert weak["question"] == strong["question"]
        strong_first = coin.random() < 0.5
        a, b = (strong["answer"], weak["answer"]) if strong_first else (weak["answer"], strong["answer"])
        a, b = fit_answers(tokenizer, strong["question"], a, b, budget)
        ra, rb = (scorer.score(strong["reference"], x)["rougeL"].fmeasure for x in (a, b))
        preferred = "A" if ra - rb >= tie_margin else "B" if rb - ra >= tie_margin else "tie"
        items.append({"id": f"h{i}", "question": strong["question"], "answer": a, "answer_b": b,
                      "labels": {"preferred": preferred, "strong": "A" if strong_first else "B"},
                      "rouge_l": [ra, rb]})
    return items


@contextlib.contextmanager
def served_judge(model: Path, log: Path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*genforge_cmd(), "serve", str(model), "--port", str(port), "--served-model-name",
                             JUDGE_NAME], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=180)
        yield url + "/v1"
    finally:
        stop_server(proc, timeout=30)


@contextlib.contextmanager
def quiet_flag():
    """Touch /tmp/QUIET for the run (waiting while someone else holds it); removed on any exit."""
    while QUIET.exists():
        print("waiting: /tmp/QUIET is held by another benchmark")
        time.sleep(20)
    QUIET.touch()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` runs on kill too
    try:
        yield
    finally:
        QUIET.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=ROOT / "runs")
    p.add_argument("--judge-url", help="an OpenAI-compatible judge instead of the served SFT model")
    p.add_argument("--judge-model", default=JUDGE_NAME)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--tie-margin", type=float, default=0.05, help="ROUGE-L F1 difference below which the label is a tie")
    p.add_argument("--context", type=int, default=128, help="the judge's context in tokens")
    p.add_argument("--max-tokens", type=int, default=26, help="tokens for the judge's JSON answer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from genforge.eval.judge import JudgeConfig
    from genforge.eval.judge_suite import judge_items

    judge_model = args.runs / "demo-finetune" / "sft" / "model"
    answers = ensure_answers(args.runs)
    tokenizer = AutoTokenizer.from_pretrained(judge_model)
    items = build_items(answers, tokenizer, args.context - args.max_tokens, args.tie_margin, args.seed)
    labels = [it["labels"]["preferred"] for it in items]
    print(f"{len(items)} items; labels: A {labels.count('A')}, B {labels.count('B')}, tie {labels.count('tie')}")

    work = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    with quiet_flag():
        t0 = time.perf_counter()
        with (served_judge(judge_model, work / "serve.log") if args.judge_url is None
              else contextlib.nullcontext(args.judge_url)) as url:
            config = JudgeConfig(url=url, model=args.judge_model, repeats=args.repeats, concurrency=args.concurrency,
                                 temperature=args.temperature, max_tokens=args.max_tokens, pairwise_rubric=RUBRIC,
                                 system_rubric=False, reason_max_chars=4, cache_path=work / "cache.sqlite")
            summary = judge_items(items, config, work / "out", mode="pairwise")
        wall = time.perf_counter() - t0
    pair = summary["pairwise"]
    judgments = [json.loads(line) for line in (work / "out" / "judgments.jsonl").read_text().splitlines()]
    ok = [j for j in judgments if j["ok"]]
    shown_first = sum(j["winner"] == "A" for j in ok) / len(ok) if ok else None
    strong = sum(j["preferred"] == next(it for it in items if it["id"] == j["id"])["labels"]["strong"]
                 for j in ok) / len(ok) if ok else None

    def row(name: str, d: dict, consistency) -> list:
        return [name, d["wins_a"], d["wins_b"], d["ties"], f"{d['agreement']:.3f}" if d["agreement"] is not None else None,
                f"{d['kappa']:.3f}" if d["kappa"] is not None else None, consistency]

    table = md_table(["decided by", "A", "B", "tie", "agreement with labels", "Cohen's kappa", "position consistency"],
                     [row("first order only (A shown first)", pair["one_order"], "—"),
                      row("both orders (win only if they agree)", pair["both_orders"],
                          f"{pair['position_consistency']:.3f}")])
    print(table)
    print(f"labels: A {labels.count('A')}, B {labels.count('B')}, tie {labels.count('tie')}; "
          f"decisive judgments kept on swap {pair['decisive_kept_on_swap']}; single judgments naming the answer "
          f"shown first {shown_first:.3f}, the SFT answer {strong:.3f}; {summary['http_calls']} calls in {wall:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"judge": summary["judge"], "judge_model_folder": str(judge_model) if args.judge_url is None else None,
           "items": len(items), "labels": {k: labels.count(k) for k in ("A", "B", "tie")},
           "tie_margin": args.tie_margin, "context": args.context, "pairwise": pair,
           "share_naming_shown_first": shown_first, "share_naming_sft_answer": strong,
           "http_calls": summary["http_calls"], "wall_s": wall, "table": table, "cpu": cpu_info(),
           "versions": versions("torch", "transformers", "openai", "scikit-learn"), "commit": git_commit(ROOT)}
    (RESULTS / "judge.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"written to {RESULTS / 'judge.json'}")


if __name__ == "__main__":
    main()
