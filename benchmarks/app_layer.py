"""The application layer, measured: semantic cache, cache-hit latency, retrieval, guard, and its cost.

    .venv/bin/python benchmarks/app_layer.py [--model RUN_OR_HF_FOLDER] [--rounds 3]
    .venv/bin/python benchmarks/app_layer.py --quick              # ~2 min: checks the script, figures are noise
    .venv/bin/python benchmarks/app_layer.py --only cache,guard   # a subset of the five sections

In one run, each section a markdown table (all recorded in the JSON):
1. cache      paraphrase-hit / false-hit rate of `evaluate_pairs` on the test split of
              benchmarks/data/cache_pairs.jsonl per threshold, with and without verification, all / en / zh.
2. latency    one client, sequential non-streamed chat requests (temperature 0, max_tokens 64, EOS ignored
              so a generation is always 64 tokens) to `genforge serve --cache`: pass 1 asks the first
              question of each paraphrase pair (misses: full generation), pass 2 the same again (exact
              hits), pass 3 the other question of each pair (near hits); p50/p95 per pass and per outcome
              (the x-genforge-cache header), and whether a near hit served its own pair's answer.
3. rag        `genforge.jobs.rag.ingest` of builtin:pydoc into a temporary store (seconds, chunks), then
              `evaluate` on benchmarks/data/rag_pydoc_questions.jsonl: hit@1/3/5, MRR, nDCG@5 per mode.
4. guard      `evaluate_guard` with the shipped detector: injection recall / false-positive rate on the
              held-out rows (split == "test") for the rules alone, the detector alone and both; the share
              flagged per category (recall for attacks, false positives for benign ones); PII precision /
              recall per type on all of guard_pii.jsonl (regexes and validators: nothing is fitted to it).
5. throughput 16 concurrent streamed chat clients, greedy, 64 new tokens, EOS ignored, when nothing hits:
              each row its own `genforge serve` process, started fresh every round (rows rotate order),
              warmed up, then timed; every prompt is a distinct ~32-token pydoc snippet (no two closer than
              the cache's threshold, none the guard refuses), so every cache lookup misses (counted from
              /metrics). Rows: plain (no flags); cache + guard redact (the like-for-like layer overhead:
              same prompts to the engine; the steps in a process of their own, the default); the same with
              `own_process: false` (the steps in threads of the server's process, as before); all on
              (--cache --rag pydoc --guard redact: RAG puts ~4 sources,
              ~800 tokens, in every prompt, so it measures a longer prompt as much as the layer).
              Median tok/s and requests/s over rounds; each row's ratio to plain. Target (issue 8): the
              layer costs under 10% of throughput at 16 clients when nothing hits.

The model: `--model` (a run directory or HF folder), else lm-nano trained `--train-steps` steps on
builtin:pydoc (as tests/serve/conftest.py's lm_run: context 128 x batch 16, but a 4096-token vocabulary)
into the work folder and reused by later runs; the served copy's positions are raised to 2048 (RoPE has
no position table) because a RAG prompt does not fit in 128 or 256 tokens. runs/demo (the demo's
model) is not the default for the same reason: its context is 128 tokens. --quick serves lm-nano with
random weights (throughput and cache behaviour do not depend on the weights' values).

Writes benchmarks/results/app_layer.json (app_layer_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, PeakRSS, cpu_info, fmt, git_commit, md_table, median, versions  # noqa: E402
from serve_throughput import child_env, free_port, make_prompts, run_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / "benchmarks" / "data"
SECTIONS = ("cache", "latency", "rag", "guard", "throughput")
SERVED_NAME = "nano"
SERVED_CONTEXT = 2048
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
IN_SERVER = "{in_server_config}"  # a serve config with `own_process: false`, written into the work folder
ROWS = {"plain": [], "cache + guard": ["--cache", "--guard", "redact"],
        "cache + guard, steps in the server's process": ["--cache", "--guard", "redact", "--config", IN_SERVER],
        "all on (cache + RAG + guard)": ["--cache", "--rag", "pydoc", "--guard", "redact"]}
LIKE_FOR_LIKE = "cache + guard"


# -- the model -------------------------------------------------------------------------------------------
def ensure_model(arg: str | None, work: Path, steps: int, preset: str = "lm-nano") -> Path:
    """An HF folder to serve: --model as given, else `preset` (trained, or random for steps 0) built here."""
    if arg:
        p = Path(arg).resolve()
        return p / "model" if (p / "model" / "config.json").is_file() else p
    folder = work / f"{preset}-{steps}-ctx{SERVED_CONTEXT}"
    if (folder / "config.json").is_file():
        return folder
    from genforge.data.text import load_documents
    from genforge.data.tokenizer import train_tokenizer
    from genforge.models.lm import LMSpec, build_lm_config, create_lm, load_lm, save_lm

    if steps == 0:
        tok = train_tokenizer(load_documents("builtin:pydoc"), "byte-bpe", 4096)
        model = create_lm(build_lm_config(LMSpec(preset=preset, context_length=SERVED_CONTEXT), tok))
    else:
        from genforge.data.tokens import prepare_text_dataset
        from genforge.jobs.train import run_recipe

        data = work / "data-pydoc-4096"
        if not (data / "stats.json").is_file():
            prepare_text_dataset("builtin:pydoc", data, vocab_size=4096)
        print(f"training {preset} for {steps} steps -> {work / 'runs'}", flush=True)
        run = run_recipe(ROOT / "configs" / f"{preset}.yaml", overrides=[
            f"dataset={data}", f"out_dir={work / 'runs'}", f"name={preset}-{steps}", "model.context_length=128",
            "train.batch_size=16", f"train.max_steps={steps}", "train.warmup_steps=20",
            f"train.eval_every={steps}", "train.eval_batches=4", "train.checkpoint_every=100000",
            "train.log_every=50"]).run.path
        model, tok = load_lm(run / "model")
        model.config.max_position_embeddings = SERVED_CONTEXT
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_lm(model, tok, tmp)
    tmp.rename(folder)  # a half-written folder is never reused
    return folder


# -- one server process --------------------------------------------------------------------------------
class Server:
    """`genforge serve FOLDER FLAGS` on a free port, probed until a chat request succeeds; RSS sampled."""

    def __init__(self, folder: Path, flags: list[str], log: Path, timeout: float = 600):
        self.port = free_port()
        self.argv = [sys.executable, "-m", "genforge.cli", "serve", str(folder), "--served-model-name",
                     SERVED_NAME, "--port", str(self.port), *flags]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1/chat/completions"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     env=child_env({}), start_new_session=True)
        self.rss = PeakRSS(self.proc.pid)
        probe = chat_body("Hello", 1, stream=False) | {"cache": False}
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                self.rss.stop()
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-500:]
                raise RuntimeError(f"exited with {self.proc.returncode} before answering; see {log}: {tail}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"did not answer in {timeout:.0f} s; see {log}")
            try:
                if httpx.post(self.url, json=probe, timeout=120).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)

    def metrics(self) -> dict[tuple, float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        text = httpx.get(self.base + "/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def stop(self) -> float:
        peak = self.rss.stop()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        return peak / 2 ** 20


def chat_body(text: str, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much the samples of `name` whose labels include `labels` grew between two scrapes."""
    def total(m: dict) -> float:
        return sum(v for (n, lab), v in m.items() if n == name and labels.items() <= dict(lab).items())
    return total(after) - total(before)


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


# -- 1. cache table --------------------------------------------------------------------------------------
def cache_section(embedder, thresholds: tuple[float, ...]) -> dict:
    from genforge.serve.cache import evaluate_pairs

    rows = [r for verify in (True, False) for r in
            evaluate_pairs(DATA / "cache_pairs.jsonl", embedder, thresholds, verify=verify, split="test")]
    by = {(r["threshold"], r["verify"], r["lang"]): r for r in rows}
    langs = ["all", *sorted({r["lang"] for r in rows} - {"all"})]
    table = []
    for verify in (True, False):
        for t in thresholds:
            cells = [f"{100 * by[t, verify, lang]['hit_rate']:.0f}% / {100 * by[t, verify, lang]['false_hit_rate']:.0f}%"
                     for lang in langs]
            table.append([f"{t:.2f}", "yes" if verify else "no", *cells])
    n = {lang: f"{by[thresholds[0], True, lang]['paraphrases']}+{by[thresholds[0], True, lang]['near_misses']}"
         for lang in langs}
    head = ("Semantic cache on the test split of benchmarks/data/cache_pairs.jsonl: paraphrase hits / false hits "
            "(pairs: paraphrases+near-misses: " + ", ".join(f"{k} {v}" for k, v in n.items()) + ")\n\n")
    return {"rows": rows, "table": head + md_table(["threshold", "verify", *langs], table, "rl" + "r" * len(langs))}


# -- 2. latency of a hit vs a generation ------------------------------------------------------------------
def latency_section(folder: Path, state: Path, n: int, new_tokens: int) -> dict:
    from genforge.serve.cache import load_pairs

    same = [r for r in load_pairs(DATA / "cache_pairs.jsonl") if r["same"]]
    pairs = same[::max(1, len(same) // n)][:n]  # spread over the file: both languages, every category
    srv = Server(folder, ["--cache", "--store", str(state / "latency")], CACHE / "logs" / "app_layer_latency.log")
    passes: dict[str, list[dict]] = {}
    try:
        with httpx.Client(timeout=600) as client:
            for text in ("What is a decorator?", "How do I sort a dictionary by value?"):  # warm-up, own keys
                client.post(srv.url, json=chat_body(text, new_tokens, stream=False))
            for name, key in (("1 miss (generation)", "a"), ("2 exact repeat", "a"), ("3 paraphrase", "b")):
                out = []
                for p in pairs:
                    t0 = time.perf_counter()
                    r = client.post(srv.url, json=chat_body(p[key], new_tokens, stream=False))
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    out.append({"s": dt, "cache": r.headers.get("x-genforge-cache"),
                                "similarity": r.headers.get("x-genforge-cache-similarity"),
                                "text": r.json()["choices"][0]["message"]["content"],
                                "tokens": r.json()["usage"]["completion_tokens"]})
                passes[name] = out
    finally:
        peak = srv.stop()
    first = [x["text"] for x in passes["1 miss (generation)"]]
    rows, summary = [], {}
    for name, out in passes.items():
        for outcome in ("all", "miss", "hit"):
            xs = [x["s"] for x in out if outcome == "all" or x["cache"] == outcome]
            if not xs or (outcome != "all" and len(xs) == len(out)):
                continue  # a per-outcome row only when the pass mixed outcomes
            s = {"n": len(xs), "p50_ms": 1000 * pct(xs, 0.5), "p95_ms": 1000 * pct(xs, 0.95)}
            summary[f"{name} [{outcome}]"] = s
            rows.append([name if outcome == "all" else f"  of which {outcome}", s["n"],
                         ", ".join(f"{c} {sum(x['cache'] == c for x in out)}" for c in ("miss", "hit", "bypass")
                                   if any(x["cache"] == c for x in out)) if outcome == "all" else None,
                         fmt(s["p50_ms"], ".1f"), fmt(s["p95_ms"], ".1f")])
    near = passes["3 paraphrase"]
    own = sum(x["cache"] == "hit" and x["text"] == t for x, t in zip(near, first))
    miss_p50 = summary["1 miss (generation) [all]"]["p50_ms"]
    ratios = {k: miss_p50 / v["p50_ms"] for k, v in summary.items() if k.startswith(("2", "3")) and "[miss]" not in k}
    langs = "+".join(sorted({p["lang"] for p in pairs}))
    table = (f"Latency over HTTP, one client, {len(pairs)} paraphrase pairs ({langs}), non-streamed, temperature 0, "
             f"{new_tokens} tokens per generation\n\n"
             + md_table(["pass", "requests", "x-genforge-cache", "p50 ms", "p95 ms"], rows, "lrlrr")
             + "\n\np50 of a generation / p50 of: " + ", ".join(f"{k} {v:.0f}x" for k, v in ratios.items())
             + f"\nnear hits that served their own pair's answer: {own} of {sum(x['cache'] == 'hit' for x in near)}")
    return {"pairs": len(pairs), "new_tokens": new_tokens, "summary": summary, "speedup_p50": ratios,
            "near_hits_with_own_answer": own, "requests": {k: [{kk: vv for kk, vv in x.items() if kk != "text"}
                                                               for x in v] for k, v in passes.items()},
            "server": " ".join(srv.argv), "startup_s": srv.startup_s, "peak_rss_mb": peak, "table": table}


# -- 3. retrieval table ---------------------------------------------------------------------------------
def rag_section(embedder, state: Path, topics: int | None) -> dict:
    from genforge.jobs.guard import read_jsonl
    from genforge.jobs.rag import eval_table, evaluate, ingest

    questions = DATA / "rag_pydoc_questions.jsonl"
    paths = ["builtin:pydoc"]
    if topics:  # --quick: the first topics of the question set, and only their questions
        rows = read_jsonl(questions)
        keep = list(dict.fromkeys(r["topic"] for r in rows))[:topics]
        paths = [f"builtin:pydoc/{t}" for t in keep]
        questions = state / "questions_subset.jsonl"
        questions.write_text("".join(json.dumps(r) + "\n" for r in rows if r["topic"] in keep))
    t0 = time.perf_counter()
    stats = ingest(paths, "pydoc", str(state / "store"), embedder=embedder)
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate("pydoc", str(questions), str(state / "store"), embedder=embedder, show=False)
    eval_s = time.perf_counter() - t0
    head = (f"Retrieval on {'builtin:pydoc' if not topics else f'{len(paths)} pydoc topics'}: "
            f"{stats['index_chunks']} chunks from {stats['sources']} sources, ingest {ingest_s:.1f} s "
            f"(chunk, embed, write); {result['questions']} questions, evaluated in {eval_s:.1f} s\n\n")
    return {"paths": paths, "ingest": stats, "ingest_s": ingest_s, "eval_s": eval_s, "questions": result["questions"],
            "modes": result["modes"], "default_mode": result["default_mode"], "table": head + eval_table(result)}


# -- 4. guard table -------------------------------------------------------------------------------------
def guard_section(embedder) -> dict:
    from genforge.jobs.guard import evaluate_guard, read_jsonl
    from genforge.serve.guard import Guard

    inj_rows = read_jsonl(DATA / "guard_injection.jsonl")
    res = evaluate_guard(Guard("redact", embedder=embedder), inj_rows, read_jsonl(DATA / "guard_pii.jsonl"))
    inj, pii = res["injection"], res["pii"]
    label = {r["category"]: r["label"] for r in inj_rows}
    t1 = md_table(["injection (held-out)", "recall", "false positives"],
                  [[k, fmt(100 * inj[k]["recall"], ".1f") + "%", fmt(100 * inj[k]["fpr"], ".1f") + "%"]
                   for k in ("rules", "detector", "combined")])
    t2 = md_table(["category", "kind", "n", "flagged (combined)"],
                  [[c, "attack" if label[c] else "benign", v["n"], f"{100 * v['flagged']:.1f}%"]
                   for c, v in inj["per_category"].items()], "llrr")
    t3 = md_table(["PII type", "gold spans", "precision", "recall"],
                  [[t, v["n_gold"], f"{100 * v['precision']:.1f}%", f"{100 * v['recall']:.1f}%"]
                   for t, v in [*pii["per_type"].items(), ("all", pii["overall"])]])
    head = (f"Guard: {inj['n_test']} held-out injection rows (threshold {inj['threshold']:.3f}); "
            f"{pii['n_texts']} PII texts (all rows)\n\n")
    return {**res, "table": head + t1 + "\n\n" + t2 + "\n\n" + t3}


# -- 5. throughput with the layer on and off ----------------------------------------------------------------
def distinct_prompts(folder: Path, embedder, n: int, length: int) -> tuple[list[str], dict]:
    """n pydoc snippets that no cache lookup can match (none within 0.75 cosine of another: the cache's
    default threshold) and that the guard lets through (a refused request would cost nothing)."""
    from genforge.serve.cache import DEFAULT_THRESHOLD
    from genforge.serve.guard import Guard

    cands, tokens = make_prompts(folder, int(n * 1.6) + 8, length)
    vecs = embedder.embed(cands)
    flagged = [s.injection for s in Guard("redact", embedder=embedder).scan(cands)]
    keep: list[int] = []
    for i in range(len(cands)):
        if not flagged[i] and (not keep or float(np.max(vecs[keep] @ vecs[i])) < DEFAULT_THRESHOLD):
            keep.append(i)
    if len(keep) < n:
        raise RuntimeError(f"only {len(keep)} usable prompts of {len(cands)}; lower --requests or --rounds")
    return [cands[i] for i in keep[:n]], {"candidates": len(cands), "flagged_by_guard": sum(flagged),
                                          "prompt_tokens_mean": tokens}


def throughput_section(folder: Path, embedder, state: Path, a) -> dict:
    per_pass = a.warmup + a.requests
    prompts, prompt_info = distinct_prompts(folder, embedder, per_pass * a.rounds * len(ROWS), a.prompt_tokens)
    blocks = iter([prompts[i:i + per_pass] for i in range(0, len(prompts), per_pass)])
    names = list(ROWS)
    recs = {name: {"flags": ROWS[name], "rounds": []} for name in names}
    for rnd in range(a.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            in_server = state / "in_server.yaml"
            in_server.write_text("own_process: false\n")
            flags = [str(in_server) if f == IN_SERVER else f for f in ROWS[name]]
            flags += ["--store", str(state / "store")] if flags else []
            log = CACHE / "logs" / f"app_layer_{name.split()[0]}.log"
            srv = Server(folder, flags, log)
            try:
                if "--cache" in flags:
                    httpx.delete(srv.base + "/v1/cache", timeout=60).raise_for_status()  # every round starts empty
                block = next(blocks)
                bodies = [chat_body(p, a.new_tokens) for p in block]
                run_http(srv.url, bodies[:a.warmup], a.clients, a.new_tokens)
                before = srv.metrics()
                res = run_http(srv.url, bodies[a.warmup:], a.clients, a.new_tokens)
                after = srv.metrics()
            finally:
                peak = srv.stop()
            res["requests_s"] = a.requests / res["wall_s"]
            res["prompt_tokens_per_request"] = metric_delta(before, after, "genforge:prompt_tokens_total") / a.requests
            res["cache_lookups"] = {r: metric_delta(before, after, "genforge:cache_lookups_total", result=r)
                                    for r in ("hit", "miss", "bypass")}
            res["rag_retrievals"] = metric_delta(before, after, "genforge:rag_retrievals_total")
            res["guard_actions"] = {k: metric_delta(before, after, "genforge:guard_actions_total", action=k)
                                    for k in ("blocked", "redacted", "logged")}
            res["step_mean_ms"] = {
                step: 1000 * metric_delta(before, after, "genforge:app_step_duration_seconds_sum", step=step) / c
                for step in ("guard_input", "cache_lookup", "retrieve", "cache_put")
                if (c := metric_delta(before, after, "genforge:app_step_duration_seconds_count", step=step))}
            # before the engine starts (the rules, the exact lookup) and the wait for the rest (the detector,
            # near matches), which overlaps the generation: latency, not CPU, so not in the sum above
            res["overlapping_ms"] = {
                step: 1000 * metric_delta(before, after, "genforge:app_step_duration_seconds_sum", step=step) / c
                for step in ("prepare", "settle")
                if (c := metric_delta(before, after, "genforge:app_step_duration_seconds_count", step=step))}
            res.update(startup_s=srv.startup_s, peak_rss_mb=peak, round=rnd + 1)
            recs[name]["rounds"].append(res)
            recs[name]["command"] = " ".join(srv.argv)
            print(f"round {rnd + 1}/{a.rounds} {name}: {res['tok_s']:.0f} tok/s, {res['requests_s']:.2f} req/s, "
                  f"cache {res['cache_lookups']}", flush=True)
    keys = ("tok_s", "requests_s", "ttft_p50", "e2e_p95", "prompt_tokens_per_request", "startup_s", "peak_rss_mb")
    for rec in recs.values():
        rec["median"] = {k: median(r[k] for r in rec["rounds"]) for k in keys}
        rec["hits_total"] = sum(r["cache_lookups"]["hit"] for r in rec["rounds"])
    base = recs["plain"]["median"]["tok_s"]
    rows = []
    for name, rec in recs.items():
        m = rec["median"]
        rec["ratio_to_plain"] = m["tok_s"] / base
        steps = statistics.mean([sum(r["step_mean_ms"].values()) for r in rec["rounds"]])
        rows.append([name, fmt(m["tok_s"]), fmt(m["requests_s"], ".2f"), f"{rec['ratio_to_plain']:.3f}",
                     fmt(m["prompt_tokens_per_request"]), fmt(m["ttft_p50"], ".3f"), fmt(m["e2e_p95"], ".2f"),
                     f"{steps:.1f}" if rec["flags"] else None, rec["hits_total"] if rec["flags"] else None,
                     fmt(m["startup_s"], ".1f")])
    cost = 1 - recs[LIKE_FOR_LIKE]["ratio_to_plain"]
    target = {"like_for_like_cost": cost, "pass": cost < 0.10,
              "all_on_cost": 1 - recs["all on (cache + RAG + guard)"]["ratio_to_plain"]}
    added = (recs["all on (cache + RAG + guard)"]["median"]["prompt_tokens_per_request"]
             - recs["plain"]["median"]["prompt_tokens_per_request"])
    table = (f"Throughput, {a.clients} clients, {a.requests} streamed chat requests per round, greedy, "
             f"{a.new_tokens} new tokens, ~{prompt_info['prompt_tokens_mean']:.0f}-token user turns, nothing hits; "
             f"medians of {a.rounds} round(s)\n\n"
             + md_table(["server", "tok/s", "req/s", "x plain", "prompt tok/req", "TTFT p50 s", "e2e p95 s",
                         "layer steps ms/req", "cache hits", "start-up s"], rows)
             + f"\n\nlayer overhead (like for like: {LIKE_FOR_LIKE}, the engine sees the same prompts): "
               f"{100 * cost:.1f}% of plain throughput -> {'PASS' if target['pass'] else 'FAIL'} (target < 10%)"
             + f"\nall on (RAG adds ~{added:.0f} prompt tokens per request): {100 * target['all_on_cost']:.1f}% "
               "below plain")
    return {"prompts": prompt_info, "rows": recs, "target": target, "table": table}


# -- main -------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a run directory or HF folder (default: lm-nano built here)")
    ap.add_argument("--preset", default="lm-nano", help="model preset built when --model is not given")
    ap.add_argument("--train-steps", type=int, default=200, help="steps for the built model (0: random weights)")
    ap.add_argument("--work-dir", default=str(CACHE / "app_layer"), help="model cache and temporary stores")
    ap.add_argument("--only", default=None, help=f"comma list of sections: {','.join(SECTIONS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64, help="timed requests per throughput round")
    ap.add_argument("--warmup", type=int, default=16, help="warm-up requests per throughput round")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=40, help="paraphrase pairs in the latency passes")
    ap.add_argument("--quick", action="store_true", help="smaller everything, random weights: checks the script")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    only = a.only.split(",") if a.only else list(SECTIONS)
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    thresholds, topics = THRESHOLDS, None
    if a.quick:
        a.rounds, a.requests, a.warmup, a.new_tokens, a.latency_requests = 1, 16, 4, 16, 10
        a.train_steps, thresholds, topics = 0, (0.75, 0.90), 6
    out_path = Path(a.out) if a.out else RESULTS / ("app_layer_quick.json" if a.quick else "app_layer.json")
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    t_start = time.perf_counter()

    from genforge.models.embeddings import Embedder

    embedder = Embedder()
    folder = ensure_model(a.model, work, a.train_steps, a.preset) if {"latency", "throughput"} & set(only) else None
    result: dict = {"benchmark": "app_layer", "quick": a.quick, "args": vars(a), "cpu": cpu,
                    "model": {"folder": str(folder), "built_here_steps": None if a.model else a.train_steps},
                    "embedder": {"name": embedder.name, "version": embedder.version}, "sections": {}}
    with tempfile.TemporaryDirectory(dir=work, prefix="state-") as tmp:
        state = Path(tmp)
        for section in SECTIONS:
            if section not in only:
                continue
            t0 = time.perf_counter()
            print(f"\n== {section}", flush=True)
            if section == "cache":
                out = cache_section(embedder, thresholds)
            elif section == "latency":
                out = latency_section(folder, state, a.latency_requests, a.new_tokens)
            elif section == "rag":
                out = rag_section(embedder, state, topics)
            elif section == "guard":
                out = guard_section(embedder)
            else:
                if "rag" not in only:  # the all-on row retrieves from the index that section builds
                    rag_section(embedder, state, topics)
                out = throughput_section(folder, embedder, state, a)
            out["seconds"] = time.perf_counter() - t0
            result["sections"][section] = out
            print("\n" + out["table"], flush=True)
    result.update(total_s=time.perf_counter() - t_start, git=git_commit(ROOT),
                  versions=versions("torch", "transformers", "sentence-transformers", "genforge", "fastapi",
                                    "uvicorn", "httpx", "bm25s"))
    if a.quick:
        print("\n(quick run: random weights, small loads, a pydoc subset: checks the script, the figures are noise)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2, default=str, ensure_ascii=False) + "\n")
    tmp_out.rename(out_path)
    print(f"wrote {out_path} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
