"""Soak: N clients for D seconds against a real `genforge serve`, with the traffic a public
endpoint gets - streaming, non-streaming, clients that leave early, oversized and malformed
requests - and the questions a soak answers:

- unexpected outcomes: a 5xx, a transport error, a broken stream, a status other than the one
  the request must get (must be 0);
- every request accounted for: each one the clients sent has exactly one outcome, and the server's
  own count of HTTP requests (genforge:http_requests_total) equals the clients' count;
- no leak: after the run nothing is left running or queued, and the server's resident memory
  after warm-up is flat (least-squares slope of RSS over time, MB/min);
- stable throughput: completion tokens and requests per minute.

    python benchmarks/soak.py                            # 16 clients x 600 s on a model it trains
    python benchmarks/soak.py --clients 4 --duration 20 --run runs/demo

Prints a table; writes JSON (benchmarks/results/soak.json by default). Exit status 1 when there
were unexpected outcomes or requests not accounted for.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, stop_server, wait_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-soak"
MODEL = "soak"
# kind -> share of the traffic
MIX = {"stream": 0.30, "nonstream": 0.25, "chat_stream": 0.10, "cancel_stream": 0.10, "cancel_wait": 0.05,
       "oversized": 0.10, "malformed": 0.10}


@dataclass
class Outcome:
    kind: str
    outcome: str  # ok | cancelled | refused (the expected 4xx) | overloaded (503) | unexpected
    status: int | None
    seconds: float
    ended: float  # time.monotonic() at the end
    tokens: int = 0
    detail: str = ""


@dataclass
class Tally:
    started: int = 0
    results: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        with self.lock:
            self.started += 1

    def add(self, o: Outcome) -> None:
        with self.lock:
            self.results.append(o)


def _genforge() -> list[str]:
    script = Path(sys.executable).parent / "genforge"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "genforge.cli"]


def train_tiny(cache: Path, steps: int) -> Path:
    """lm-nano on the CPython docs through the real CLI (cached between runs)."""
    run = cache / "runs" / MODEL
    if (run / "model" / "config.json").is_file():
        return run
    data = cache / "data"
    if not (data / "stats.json").is_file():
        subprocess.run([*_genforge(), "data", "prepare", "builtin:pydoc", "--out", str(data), "--vocab-size", "512"],
                       check=True, cwd=ROOT)
    subprocess.run([*_genforge(), "train", str(ROOT / "configs" / "lm-nano.yaml"), "--set", f"dataset={data}",
                    "--set", f"out_dir={cache / 'runs'}", "--set", f"name={MODEL}", "--set", f"train.max_steps={steps}",
                    # the test suite's settings: 128 x 16 tokens a step, enough for varied text
                    "--set", "model.context_length=128", "--set", "train.batch_size=16",
                    "--set", "train.warmup_steps=20", "--set", f"train.eval_every={steps}",
                    "--set", "train.eval_batches=4", "--set", "train.checkpoint_every=1000000"],
                   check=True, cwd=ROOT)
    return run


def start_server(run: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [*_genforge(), "serve", str(run), "--port", str(port), "--served-model-name", MODEL,
           "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
           "--request-timeout", str(args.request_timeout), "--shutdown-timeout", "10"]
    if not args.compile:
        cmd.append("--enforce-eager")
    env = {**os.environ, "GENFORGE_API_KEYS": KEY}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wait_healthy(f"http://127.0.0.1:{port}", proc, log, timeout=600)
    return proc


PROMPTS = ["The list", "def f(x):\n    return", "In Python, a class", "import", "for i in range(",
           "The with statement is used to", "Exceptions are", "A dictionary maps"]


def _read_sse(r: httpx.Response, stop_after: int | None = None) -> tuple[int, bool, str]:
    """(content chunks, saw [DONE], problem): parse every event as the openai client would."""
    chunks, done = 0, False
    for line in r.iter_lines():
        if not line:
            continue
        if not line.startswith("data: "):
            return chunks, done, f"not an SSE data line: {line[:80]!r}"
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        if done:
            return chunks, done, "data after [DONE]"
        obj = json.loads(data)
        if "error" in obj:
            return chunks, done, f"error event: {obj['error'].get('message', '')[:120]}"
        if obj.get("choices"):
            chunks += 1
        if stop_after is not None and chunks >= stop_after:
            return chunks, done, ""
    return chunks, done, "" if done else "stream ended without [DONE]"


def one_request(c: httpx.Client, base: str, kind: str, rng: random.Random) -> Outcome:
    auth = {"Authorization": f"Bearer {KEY}"}
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(8, 64)
    t0 = time.monotonic()

    def done(outcome: str, status: int | None, tokens: int = 0, detail: str = "") -> Outcome:
        end = time.monotonic()
        return Outcome(kind, outcome, status, end - t0, end, tokens, detail)

    try:
        if kind in ("stream", "chat_stream", "cancel_stream"):
            chat = kind == "chat_stream" or (kind == "cancel_stream" and rng.random() < 0.5)
            body = ({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
            body.update(model=MODEL, max_tokens=max_tokens, stream=True, temperature=rng.choice([0, 0.8]))
            path = "/v1/chat/completions" if chat else "/v1/completions"
            stop_after = rng.randint(1, 3) if kind == "cancel_stream" else None
            with c.stream("POST", base + path, json=body, headers=auth) as r:
                if r.status_code == 503:
                    return done("overloaded", 503)
                if r.status_code != 200:
                    return done("unexpected", r.status_code, detail=r.read().decode()[:200])
                chunks, finished, problem = _read_sse(r, stop_after)
            if problem:
                return done("unexpected", 200, chunks, problem)
            if stop_after is not None and not finished:
                return done("cancelled", 200, chunks)
            return done("ok", 200, chunks)
        if kind in ("nonstream", "cancel_wait"):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "n": rng.choice([1, 1, 2])}
            if kind == "cancel_wait":  # the client gives up while the server works
                try:
                    c.post(base + "/v1/completions", json={**body, "max_tokens": 64, "ignore_eos": True},
                           headers=auth, timeout=0.02)
                except httpx.TimeoutException:
                    return done("cancelled", None)
                return done("ok", 200)  # it was faster than the client's patience
            r = c.post(base + "/v1/completions", json=body, headers=auth)
            if r.status_code == 503:
                return done("overloaded", 503)
            if r.status_code != 200:
                return done("unexpected", r.status_code, detail=r.text[:200])
            out = r.json()
            if len(out["choices"]) != body["n"] or any(ch["finish_reason"] not in ("stop", "length")
                                                         for ch in out["choices"]):
                return done("unexpected", 200, detail=f"bad choices: {r.text[:200]}")
            return done("ok", 200, out["usage"]["completion_tokens"])
        if kind == "oversized":
            case = rng.choice(["body", "context", "n", "stop"])
            body, want = {"model": MODEL, "prompt": prompt}, 400
            if case == "body":
                body["prompt"], want = "x" * (1 << 20) + "y", 413
            elif case == "context":
                body["prompt"] = "word " * 2000
            elif case == "n":
                body["n"] = 99
            else:
                body["stop"] = ["a", "b", "c", "d", "e"]
            r = c.post(base + "/v1/completions", json=body, headers=auth)
            ok = r.status_code == want and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
            return done("refused" if ok else "unexpected", r.status_code, detail="" if ok else r.text[:200])
        # malformed
        case = rng.choice(["json", "deep", "type", "model", "auth", "field"])
        headers, want, url = {**auth, "content-type": "application/json"}, 400, base + "/v1/completions"
        content = json.dumps({"model": MODEL, "prompt": prompt}).encode()
        if case == "json":
            content = b'{"prompt": "x",'
        elif case == "deep":
            content = b"[" * 50_000 + b"]" * 50_000
        elif case == "type":
            content = json.dumps({"model": MODEL, "prompt": prompt, "temperature": "hot"}).encode()
        elif case == "model":
            content, want = json.dumps({"model": "nope", "prompt": prompt}).encode(), 404
        elif case == "auth":
            headers, want = {"Authorization": "Bearer wrong", "content-type": "application/json"}, 401
        else:
            content = json.dumps({"model": MODEL, "prompt": prompt, "logit_bias": {"1": 3}}).encode()
        r = c.post(url, content=content, headers=headers)
        ok = r.status_code == want and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
        return done("refused" if ok else "unexpected", r.status_code, detail="" if ok else r.text[:200])
    except httpx.TimeoutException as e:
        return done("unexpected", None, detail=f"client timeout: {type(e).__name__}")
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return done("unexpected", None, detail=f"{type(e).__name__}: {e}"[:200])


def client_loop(base: str, until: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    with httpx.Client(timeout=120) as c:
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            tally.start()
            tally.add(one_request(c, base, kind, rng))


def rss_sampler(pid: int, stop: threading.Event, every: float, out: list[tuple[float, float]]) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss + sum(ch.memory_info().rss for ch in proc.children(recursive=True))
        except psutil.Error:
            return
        out.append((time.monotonic(), rss / 2**20))
        stop.wait(every)


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    t0 = points[0][0]
    xs, ys = [(t - t0) / 60 for t, _ in points], [m for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else None


def server_counts(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    total, running, waiting = 0.0, 0.0, 0.0
    for line in text.splitlines():
        if line.startswith("genforge:http_requests_total{") and 'endpoint="/metrics"' not in line \
                and 'endpoint="/health"' not in line:
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("genforge:num_requests_running{"):
            running = float(line.rsplit(" ", 1)[1])
        elif line.startswith("genforge:num_requests_waiting{"):
            waiting = float(line.rsplit(" ", 1)[1])
    return {"http_requests": total, "running": running, "waiting": waiting}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=None, help="seconds left out of the RSS slope "
                   "(default: a fifth of the duration, at most 60)")
    p.add_argument("--run", default=None, help="a run dir / HF folder to serve (default: train lm-nano)")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "genforge-soak"))
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--compile", action="store_true", help="serve with torch.compile (slower start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else train_tiny(cache, args.train_steps)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = cache / "serve.log"
    proc = start_server(run, port, args, log)
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=rss_sampler, args=(proc.pid, stop, max(0.5, args.duration / 300), rss),
                               daemon=True)
    tally = Tally()
    try:
        sampler.start()
        start = time.monotonic()
        until = start + args.duration
        threads = [threading.Thread(target=client_loop, args=(base, until, args.seed * 1000 + i, tally))
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        time.sleep(1.0)  # let cancellations land before asking the server what it still holds
        counts = server_counts(base)
    finally:
        stop.set()
        stop_server(proc, timeout=60)

    results = tally.results
    by_outcome = Counter(r.outcome for r in results)
    by_kind = {k: dict(Counter(r.outcome for r in results if r.kind == k)) for k in MIX}
    unexpected = [asdict(r) for r in results if r.outcome == "unexpected"]
    # requests the clients sent that reached the server (a client timeout before the reply still
    # reached it); the server counts each HTTP request once, 499s included
    accounted = len(results) == tally.started and counts["http_requests"] == len(results)
    after = [(t, m) for t, m in rss if t - start >= warmup]
    minutes: dict[int, dict] = {}
    for r in results:
        m = int((r.ended - start) // 60)
        slot = minutes.setdefault(m, {"minute": m, "requests": 0, "completion_tokens": 0})
        slot["requests"] += 1
        slot["completion_tokens"] += r.tokens
    report = {
        "clients": args.clients, "duration_s": round(wall, 1), "warmup_s": warmup, "model": str(run),
        "requests": len(results), "started": tally.started, "by_outcome": dict(by_outcome), "by_kind": by_kind,
        "unexpected": len(unexpected), "unexpected_examples": unexpected[:20],
        "server_http_requests": counts["http_requests"], "left_running": counts["running"],
        "left_waiting": counts["waiting"], "all_accounted_for": accounted,
        "rss_mb": {"start": rss[0][1] if rss else None, "end": rss[-1][1] if rss else None,
                   "max": max((m for _, m in rss), default=None),
                   "slope_after_warmup_mb_per_min": slope_mb_per_min(after), "samples": len(rss)},
        "per_minute": [minutes[k] for k in sorted(minutes)],
        "requests_per_s": round(len(results) / wall, 2),
        "completion_tokens_per_s": round(sum(r.tokens for r in results) / wall, 1),
        "latency_s_p50": _pct([r.seconds for r in results if r.outcome == "ok"], 50),
        "latency_s_p95": _pct([r.seconds for r in results if r.outcome == "ok"], 95),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _print(report)
    ok = not unexpected and accounted and counts["running"] == 0 and counts["waiting"] == 0
    print(f"\n{'PASS' if ok else 'FAIL'}; JSON written to {out}")
    return 0 if ok else 1


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 3)


def _print(r: dict) -> None:
    rows = [("clients x seconds", f"{r['clients']} x {r['duration_s']}"),
            ("requests (started / finished)", f"{r['started']} / {r['requests']}"),
            ("server-counted HTTP requests", f"{r['server_http_requests']:.0f}"),
            ("all accounted for", str(r["all_accounted_for"])),
            ("unexpected", str(r["unexpected"])),
            ("left running / waiting", f"{r['left_running']:.0f} / {r['left_waiting']:.0f}"),
            ("requests/s", str(r["requests_per_s"])), ("completion tokens/s", str(r["completion_tokens_per_s"])),
            ("latency p50 / p95 (ok)", f"{r['latency_s_p50']} / {r['latency_s_p95']} s"),
            ("RSS start / end / max (MB)", "{:.0f} / {:.0f} / {:.0f}".format(
                r["rss_mb"]["start"] or 0, r["rss_mb"]["end"] or 0, r["rss_mb"]["max"] or 0)),
            ("RSS slope after warm-up", f"{r['rss_mb']['slope_after_warmup_mb_per_min']} MB/min")]
    width = max(len(k) for k, _ in rows)
    print("\n| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print("\n| outcome | " + " | ".join(MIX) + " |")
    print("|---|" + "---|" * len(MIX))
    for outcome in ("ok", "cancelled", "refused", "overloaded", "unexpected"):
        print(f"| {outcome} | " + " | ".join(str(r["by_kind"][k].get(outcome, 0)) for k in MIX) + " |")
    print("\nper minute: " + ", ".join(f"{m['minute']}: {m['requests']} req / {m['completion_tokens']} tok"
                                        for m in r["per_minute"]))
    for ex in r["unexpected_examples"][:5]:
        print(f"  unexpected: {ex['kind']} status={ex['status']} {ex['detail']}")


if __name__ == "__main__":
    sys.exit(main())
