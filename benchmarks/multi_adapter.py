"""Many LoRA adapters over one base, served: throughput with 4 adapters mixed in one batch vs the base alone.

    .venv/bin/python benchmarks/multi_adapter.py [--model RUN_OR_HF_FOLDER] [--rounds 3] [--requests 64]
    .venv/bin/python benchmarks/multi_adapter.py --quick        # one short round: checks the script

Rows, each its own `genforge serve` process (default decode mode: prepacked), started fresh every round
(rows rotate order), warmed up, then timed with `--clients` concurrent streamed completion clients
(greedy, `--new-tokens` tokens, EOS ignored, distinct ~`--prompt-tokens`-token pydoc snippets):
  base alone            `genforge serve MODEL`; every request names the base
  4 adapters mixed      `genforge serve MODEL --adapters-dir DIR --max-loaded-adapters 4`; request i names
                        adapter i % 4, so every decode step carries all four (models/multilora.py)
  base, adapters loaded the same adapter server, every request names the base: what serving adapters
                        costs the base's own traffic (a step whose rows are all base skips the delta)
The adapters: peft LoRA r=`--rank` on every projection of every layer (q k v o gate up down, peft's
"all-linear" for a Llama), B random (peft starts it at 0), written once into the work folder.
The model: `--model`, else lm-tiny with random weights (throughput does not depend on their values),
as benchmarks/serve_throughput.py builds it. Writes benchmarks/results/multi_adapter.json
(multi_adapter_quick.json with --quick) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, cpu_info, fmt, git_commit, md_table, median, versions  # noqa: E402
from serve_throughput import Contender, Server, body_for, ensure_model, make_prompts, run_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "base"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: Path, out: Path, n: int, rank: int) -> Path:
    """n peft adapters over `model` in out/a0..a{n-1} (reused when present)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i in range(n):
        folder = out / f"a{i}"
        if (folder / "adapter_model.safetensors").is_file():
            continue
        base = AutoModelForCausalLM.from_pretrained(model)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                     task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_model.peft_config["default"].base_model_name_or_path = str(model.resolve())
        peft_model.save_pretrained(folder)
    return out


def server_for(row: str, model: Path, adapters: Path) -> Contender:
    flags = [] if row == "base alone" else ["--adapters-dir", str(adapters), "--max-loaded-adapters", "4"]
    return Contender(row, "genforge", cmd=lambda port: [sys.executable, "-m", "genforge.cli", "serve", str(model),
                                                        "--served-model-name", NAME, "--port", port, *flags],
                     model_id=NAME)


def metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(url, timeout=30).text.splitlines():
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.requests, a.warmup, a.new_tokens = 1, 32, 8, 32
    model = ensure_model(a.model, 0)
    adapters = make_adapters(model, CACHE / "multi_adapter" / f"{model.parent.name}-r{a.rank}", 4, a.rank)
    rows = ["base alone", "4 adapters mixed", "base, adapters loaded"]
    per = a.warmup + a.requests
    prompts, prompt_mean = make_prompts(model, per * a.rounds * len(rows), a.prompt_tokens)
    blocks = iter(prompts[i:i + per] for i in range(0, len(prompts), per))
    recs: dict[str, dict] = {r: {"rounds": []} for r in rows}
    for rnd in range(a.rounds):
        for row in rows[rnd % len(rows):] + rows[:rnd % len(rows)]:
            c = server_for(row, model, adapters)
            probe = body_for(c, "greedy", "Hello", 0, 1, stream=False)
            log = CACHE / "logs" / f"multi_adapter_{row.split()[0]}.log"
            load = os.getloadavg()[0]
            srv = Server(c, probe, log)
            try:
                bodies = [body_for(c, "greedy", t, i, a.new_tokens) for i, t in enumerate(next(blocks))]
                if row == "4 adapters mixed":
                    for i, b in enumerate(bodies):
                        b["model"] = f"a{i % 4}"
                run_http(srv.url, bodies[:a.warmup], a.clients, a.new_tokens)
                res = run_http(srv.url, bodies[a.warmup:], a.clients, a.new_tokens)
                metrics = srv.url.replace("/v1/completions", "/metrics")
                res["adapter_tokens"] = {f"a{i}": metric(metrics, "genforge:adapter_generation_tokens_total",
                                                         adapter=f"a{i}") for i in range(4)}
            finally:
                info = srv.stop()
            res.update(startup_s=srv.startup_s, peak_rss_mb=info["peak_rss_mb"], round=rnd + 1, load_before=load)
            recs[row]["rounds"].append(res)
            recs[row]["command"] = " ".join(srv.argv)
            print(f"round {rnd + 1}/{a.rounds} {row}: {res['tok_s']:.0f} tok/s (load {load:.1f})", flush=True)
    keys = ("tok_s", "ttft_p50", "e2e_p95", "startup_s", "peak_rss_mb")
    for rec in recs.values():
        rec["median"] = {k: median([r[k] for r in rec["rounds"]]) for k in keys}
    base = recs["base alone"]["median"]["tok_s"]
    table_rows = []
    for row, rec in recs.items():
        m = rec["median"]
        rec["ratio_to_base"] = m["tok_s"] / base
        table_rows.append([row, fmt(m["tok_s"]), f"{rec['ratio_to_base']:.3f}", fmt(m["ttft_p50"], ".3f"),
                           fmt(m["e2e_p95"], ".2f"), fmt(m["startup_s"], ".1f"), fmt(m["peak_rss_mb"])])
    table = (f"{a.clients} clients, {a.requests} streamed completions per round, greedy, {a.new_tokens} new tokens, "
             f"~{prompt_mean:.0f}-token prompts, LoRA r={a.rank} on all 7 projections; medians of {a.rounds} "
             f"round(s)\n\n" + md_table(["server", "tok/s", "x base", "TTFT p50 s", "e2e p95 s", "start-up s",
                                         "peak RSS MB"], table_rows))
    print(table)
    out = {"settings": vars(a), "model": str(model), "adapters": str(adapters), "rows": recs, "table": table,
           "cpu": cpu_info(), "versions": versions("torch", "transformers", "peft"), "commit": git_commit(ROOT)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("multi_adapter_quick.json" if a.quick else "multi_adapter.json")
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
