"""The gateway's overhead: N concurrent streaming clients direct to an engine vs through a
`genforge serve --upstream` in front of that same engine (each server its own process).

Engines: `genforge serve` (default) or llama.cpp's `llama-server` (--engine llama: the same model converted
to an f32 GGUF, started as PEERS.md says, `-np 16 -c 2048 -t 2`; set up by `python benchmarks/peers.py
--llama`). Before timing, the pass-through is checked and recorded: greedy text and usage direct == via the
gateway, streamed chunks the same and concatenating to that text, an over-long prompt's error passing with
its status and body. Rows: direct, gateway (no app layer: pure forwarding), and optionally gateway+guard
(--guard redact: every chunk through the output filter). Tokens/s and TTFT p50/p95 from the client side;
the prompts and load are the same for every row, and the upstream is the same process throughout.
Each process's CPU time over each round comes from /proc: the gateway's CPU ms per 1k tokens is the hop's cost
wherever it runs.

    PYTHONPATH=src python benchmarks/upstream_overhead.py --clients 8 --requests 32 --new-tokens 32
    PYTHONPATH=src python benchmarks/upstream_overhead.py --engine llama --rounds 3 --aggregate median \
        --clients 16 --requests 64 --out benchmarks/results/upstream_overhead_llama.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, fmt, git_commit, md_table, versions  # noqa: E402
from peers import convert_gguf, llama_command, setup_llama_server  # noqa: E402
from serve_throughput import ensure_model, free_port, make_prompts, run_http  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def start(args: list[str], log: Path, command: Callable[[int], list[str]] | None = None
          ) -> tuple[subprocess.Popen, str]:
    """`genforge serve ARGS` (or `command(port)`: another engine) on a free port, once /health is 200."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    argv = command(port) if command else [sys.executable, "-m", "genforge.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env)
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


def _stream_chunks(url: str, body: dict) -> tuple[list[str], dict | None]:
    """The text of each streamed event (in order) and the final usage."""
    texts, usage = [], None
    with httpx.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=300) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            usage = event.get("usage") or usage
            texts += [c.get("text") or "" for c in event.get("choices") or [] if c.get("text")]
    return texts, usage


def _counts(usage: dict | None) -> tuple | None:
    return None if usage is None else tuple(usage.get(k) for k in ("prompt_tokens", "completion_tokens",
                                                                     "total_tokens"))


def passthrough_checks(direct: str, gateway: str, model: str, prompt: str) -> dict:
    """Is the gateway faithful? The same greedy request both ways: text, usage, streamed chunks; and an
    over-long prompt's error (status and body). Each check: the values seen and whether they agree."""
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    d = httpx.post(direct + "/v1/completions", json=body, timeout=300).json()
    v = httpx.post(gateway + "/v1/completions", json=body, timeout=300).json()
    d_text, v_text = d["choices"][0]["text"], v["choices"][0]["text"]
    d_chunks, d_usage = _stream_chunks(direct + "/v1/completions", body)
    v_chunks, v_usage = _stream_chunks(gateway + "/v1/completions", body)
    long = {**body, "prompt": prompt * 200, "max_tokens": 4}  # longer than any context served here
    d_err = httpx.post(direct + "/v1/completions", json=long, timeout=300)
    v_err = httpx.post(gateway + "/v1/completions", json=long, timeout=300)
    return {
        "greedy_text": {"ok": d_text == v_text and bool(v_text), "direct": d_text, "gateway": v_text},
        # the counts: llama.cpp's prompt cache makes a repeated prompt's cached-token details differ by request
        "usage": {"ok": _counts(d["usage"]) == _counts(v["usage"]), "direct": d["usage"], "gateway": v["usage"]},
        "stream_chunks": {"ok": d_chunks == v_chunks and len(v_chunks) > 1 and "".join(v_chunks) == v_text,
                          "direct": d_chunks, "gateway": v_chunks},
        "stream_usage": {"ok": d_usage is not None and _counts(d_usage) == _counts(v_usage), "direct": d_usage, "gateway": v_usage},
        "error": {"ok": d_err.status_code >= 400 and d_err.status_code == v_err.status_code
                  and d_err.json() == v_err.json(), "direct_status": d_err.status_code,
                  "gateway_status": v_err.status_code, "direct": d_err.json(), "gateway": v_err.json()},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_round(url: str, bodies: list[dict], a: argparse.Namespace, pids: dict[str, int]) -> dict:
    """One round of the load, plus each process's CPU over it: the gateway's CPU per 1k tokens is the hop's
    cost wherever it runs (here it also takes those cycles from the engine, which shares the 2 cores)."""
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    r = run_http(url + "/v1/completions", bodies, a.clients, a.new_tokens)
    cpu = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
    return {**r, "cpu_s": cpu, **{f"{role}_cpu_ms_per_1k_tokens": 1e6 * v / max(r["tokens"], 1)
                                  for role, v in cpu.items()}}


def aggregate(rounds: list[dict], how: str) -> dict:
    """The best round (by tok/s), or each figure's median over the rounds."""
    if how == "best":
        return max(rounds, key=lambda r: r["tok_s"])
    keys = ("tok_s", "ttft_p50", "ttft_p95", "e2e_p50", "e2e_p95", "short_requests", "retried_requests",
            *(k for k in rounds[0] if k.endswith("_cpu_ms_per_1k_tokens")))
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


def start_engine(a: argparse.Namespace, folder: Path, logs: Path) -> tuple[subprocess.Popen, str, str, dict]:
    """(process, URL, the model name requests use, what ran) of the engine the gateway goes in front of."""
    if a.engine == "genforge":
        proc, url = start([str(folder), "--served-model-name", "m"], logs / "upstream.log")
        return proc, url, "m", {"engine": "genforge serve", "model": str(folder)}
    info = setup_llama_server(build=False)
    if info["status"] != "ok":
        raise SystemExit(f"llama-server: {info['status']}")
    gguf = convert_gguf(folder, "f32")
    if gguf["status"] != "ok":
        raise SystemExit(f"GGUF conversion: {gguf['status']}")
    proc, url = start([], logs / "llama-server.log", command=lambda port: llama_command(info["binary"], gguf["path"],
                                                                                         port))
    return proc, url, "lm-tiny", {"engine": "llama.cpp llama-server", **info, "gguf": gguf,
                                  "command": " ".join(proc.args)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder or run (default: random lm-tiny, built once)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--engine", choices=["genforge", "llama"], default="genforge",
                   help="the upstream: genforge serve, or llama.cpp's llama-server (peers.py --llama sets it up)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every row")
    p.add_argument("--aggregate", choices=["best", "median"], default="best",
                   help="per row: the best round (by tok/s), or each figure's median over the rounds")
    p.add_argument("--guard", action="store_true", help="also measure a gateway with --guard redact")
    p.add_argument("--out", default=str(RESULTS / "upstream_overhead.json"))
    a = p.parse_args()

    folder = ensure_model(a.model, 0)
    prompts, n_prompt = make_prompts(folder, a.requests, a.prompt_tokens)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "genforge-upstream-bench"
    logs.mkdir(parents=True, exist_ok=True)
    upstream, up_url, model, engine = start_engine(a, folder, logs)
    gateways = {"gateway": ["--upstream", up_url]}
    if a.guard:
        gateways["gateway+guard"] = ["--upstream", up_url, "--guard", "redact", "--state-dir", str(logs / "state")]
    procs, urls = [], {"direct": up_url}
    try:
        for name, args in gateways.items():
            proc, url = start(args, logs / f"{name}.log")
            procs.append(proc)
            urls[name] = url
        checks = passthrough_checks(up_url, urls["gateway"], model, prompts[0])
        print("pass-through:", {k: v["ok"] for k, v in checks.items()}, flush=True)
        bodies = [{"model": model, "prompt": pr, "max_tokens": a.new_tokens, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for pr in prompts]
        run_http(up_url + "/v1/completions", bodies[: a.clients], a.clients, a.new_tokens)  # warm-up
        rounds: dict[str, list[dict]] = {name: [] for name in urls}
        pids = {"engine": upstream.pid, **{name: proc.pid for name, proc in zip(gateways, procs)}}
        for _ in range(a.rounds):
            for name, url in urls.items():
                rounds[name].append(timed_round(url, bodies, a, pids))
    finally:
        for proc in procs:
            stop(proc)
        stop(upstream)
    best = {name: aggregate(rs, a.aggregate) for name, rs in rounds.items()}
    base = best["direct"]
    rows = [[name, fmt(r["tok_s"], ".1f"), fmt(r["tok_s"] / base["tok_s"], ".3f"), fmt(r["ttft_p50"] * 1e3, ".1f"),
             fmt(r["ttft_p95"] * 1e3, ".1f"), fmt((r["ttft_p50"] - base["ttft_p50"]) * 1e3, "+.1f"),
             fmt(r["engine_cpu_ms_per_1k_tokens"], ".0f"),
             fmt(r.get(f"{name}_cpu_ms_per_1k_tokens") if name != "direct" else None, ".0f")]
            for name, r in best.items()]
    table = md_table(["path", "tok/s", "vs direct", "TTFT p50 ms", "TTFT p95 ms", "TTFT p50 added ms",
                      "engine CPU ms / 1k tok", "gateway CPU ms / 1k tok"], rows)
    how = f"best of {a.rounds} rounds" if a.aggregate == "best" else f"medians of {a.rounds} alternated rounds"
    print(f"\n{engine['engine']}: {a.clients} streaming clients, {a.requests} requests of ~{n_prompt:.0f} prompt "
          f"tokens -> {a.new_tokens} tokens (greedy, ignore_eos); {how}\n\n{table}")
    record = {"benchmark": "upstream_overhead", "cpu": cpu_info(), "git_commit": git_commit(ROOT),
              "versions": versions("torch", "transformers", "fastapi", "uvicorn", "httpx"),
              "settings": {**vars(a), "model": str(folder), "prompt_tokens_mean": n_prompt,
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1")},
              "engine": engine, "passthrough_checks": checks, "results": best, "rounds": rounds, "table": table}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
