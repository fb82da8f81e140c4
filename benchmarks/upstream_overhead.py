"""The gateway's overhead: N concurrent streaming clients direct to a `genforge serve` vs through a
`genforge serve --upstream` in front of that same server (each server its own process).

Rows: direct, gateway (no app layer: pure forwarding), and optionally gateway+guard (--guard redact:
every chunk through the output filter). Tokens/s and TTFT p50/p95 from the client side; the prompts and
load are the same for every row, and the upstream is the same process throughout.

    PYTHONPATH=src python benchmarks/upstream_overhead.py --clients 8 --requests 32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, fmt, git_commit, md_table, versions  # noqa: E402
from serve_throughput import ensure_model, free_port, make_prompts, run_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "genforge.cli", "serve", *args, "--port", str(port)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not come up:\n{log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or run (default: random lm-tiny, built once)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best round of each row is kept")
    p.add_argument("--guard", action="store_true", help="also measure a gateway with --guard redact")
    p.add_argument("--out", default=str(RESULTS / "upstream_overhead.json"))
    a = p.parse_args()

    folder = ensure_model(a.model, 0)
    prompts, n_prompt = make_prompts(folder, a.requests, a.prompt_tokens)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "genforge-upstream-bench"
    logs.mkdir(parents=True, exist_ok=True)
    upstream, up_url = start([str(folder), "--served-model-name", "m"], logs / "upstream.log")
    gateways = {"gateway": ["--upstream", up_url]}
    if a.guard:
        gateways["gateway+guard"] = ["--upstream", up_url, "--guard", "redact", "--state-dir", str(logs / "state")]
    procs, urls = [], {"direct": up_url}
    try:
        for name, args in gateways.items():
            proc, url = start(args, logs / f"{name}.log")
            procs.append(proc)
            urls[name] = url
        bodies = [{"model": "m", "prompt": pr, "max_tokens": a.new_tokens, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for pr in prompts]
        run_http(up_url + "/v1/completions", bodies[: a.clients], a.clients, a.new_tokens)  # warm-up
        rounds: dict[str, list[dict]] = {name: [] for name in urls}
        for _ in range(a.rounds):
            for name, url in urls.items():
                rounds[name].append(run_http(url + "/v1/completions", bodies, a.clients, a.new_tokens))
    finally:
        for proc in procs:
            stop(proc)
        stop(upstream)
    best = {name: max(rs, key=lambda r: r["tok_s"]) for name, rs in rounds.items()}
    base = best["direct"]
    rows = [[name, fmt(r["tok_s"], ".1f"), fmt(r["tok_s"] / base["tok_s"], ".3f"), fmt(r["ttft_p50"] * 1e3, ".1f"),
             fmt(r["ttft_p95"] * 1e3, ".1f"), fmt((r["ttft_p50"] - base["ttft_p50"]) * 1e3, "+.1f")]
            for name, r in best.items()]
    table = md_table(["path", "tok/s", "vs direct", "TTFT p50 ms", "TTFT p95 ms", "TTFT p50 added ms"], rows)
    print(f"\n{a.clients} streaming clients, {a.requests} requests of ~{n_prompt:.0f} prompt tokens -> "
          f"{a.new_tokens} tokens (greedy, ignore_eos); best of {a.rounds} rounds\n\n{table}")
    record = {"benchmark": "upstream_overhead", "cpu": cpu_info(), "git_commit": git_commit(ROOT),
              "versions": versions("torch", "transformers", "fastapi", "uvicorn", "httpx"),
              "settings": {**vars(a), "model": str(folder), "prompt_tokens_mean": n_prompt,
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")},
              "results": best, "rounds": rounds, "table": table}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
