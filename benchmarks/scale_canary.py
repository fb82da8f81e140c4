"""Section "canary" of benchmarks/scale.py: switching model versions under load.

N clients send requests for T seconds (half streamed, half not; 16 tokens each, greedy, each client
with its own `user`) to one server while the served version changes twice: at T/3 to version 2, at
2T/3 back to version 1. Two contenders, each a `genforge serve` process of its own, one after the
other, on the same two registry versions of one random Llama (hidden `--canary-hidden`, 4 layers):

  promote   genforge serve --model m@production --canary m@2=10%, then POST /admin/promote and
            POST /admin/rollback: the switch inside the running server (serve/versions.py)
  restart   genforge serve --model m@1, then SIGTERM (it drains what is in flight) and a new
            `genforge serve --model m@2` on the same port, and back: the switch without a registry

Counted per contender: requests by the version that answered (x-genforge-model-version), failed
requests (a transport error, a status other than 200, a stream without [DONE]: must be 0 for
promote; a client retries 50 ms after a failure, so while a server is down the count grows with the
downtime), latency p50/p95 of the requests that started before the first switch, during a switch (from
its start to 2 s after it ended) and after, and how long each switch took.

    .venv/bin/python benchmarks/scale.py --only canary [--canary-clients 8] [--canary-duration 60]
    .venv/bin/python benchmarks/scale_canary.py          # the same section alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, free_port, md_table, stop_server, wait_healthy  # noqa: E402

MODEL = "m"
MAX_TOKENS = 16
SWITCH_WINDOW_S = 2.0
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def add_canary_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--canary-clients", type=int, default=8, help="canary: concurrent clients")
    ap.add_argument("--canary-duration", type=float, default=60.0, help="canary: seconds of load per contender")
    ap.add_argument("--canary-hidden", type=int, default=128, help="canary: hidden size of the random Llama")


# ------------------------------------------------------------------------------ models and processes

def _save_versions(root: Path, hidden: int) -> list[Path]:
    """Two folders of one random Llama, the second with perturbed weights (another digest and text)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    runs = []
    for i in range(2):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
        folder = root / f"run-{i + 1}" / "model"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        runs.append(folder.parent)
    return runs


def _genforge(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "genforge.cli", *args], capture_output=True, text=True,
                          env=CHILD_ENV, cwd=ROOT, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"genforge {' '.join(args)} failed: {done.stderr}")


def _start(ref: str, port: int, where: list[str], log: Path, *extra: str) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "genforge.cli", "serve", "--model", ref, "--port", str(port),
                                 *where, *extra], stdout=out, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=ROOT)


# ------------------------------------------------------------------------------ load

def _one(client: httpx.Client, url: str, user: str, stream: bool) -> dict:
    body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "user": user, "stream": stream}
    started = time.monotonic()
    out = {"start": started, "stream": stream, "version": None, "ok": False, "error": None}
    try:
        if stream:
            with client.stream("POST", url + "/v1/completions", json=body) as r:
                out["version"] = r.headers.get("x-genforge-model-version")
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                out["ok"] = r.status_code == 200 and bool(lines) and lines[-1] == "data: [DONE]"
                if not out["ok"]:
                    out["error"] = f"status {r.status_code}, {len(lines)} events, last {lines[-1:]}"
        else:
            r = client.post(url + "/v1/completions", json=body)
            out["version"] = r.headers.get("x-genforge-model-version")
            out["ok"] = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            if not out["ok"]:
                out["error"] = f"status {r.status_code}: {r.text[:200]}"
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["end"] = time.monotonic()
    return out


def _load(url: str, clients: int, until: float, results: list, lock: threading.Lock) -> list[threading.Thread]:
    def client_loop(i: int) -> None:
        with httpx.Client(timeout=60) as client:
            j = 0
            while time.monotonic() < until:
                row = _one(client, url, f"client-{i}-{j % 25}", stream=j % 2 == 0)
                with lock:
                    results.append(row)
                j += 1
                if not row["ok"]:
                    time.sleep(0.05)  # a refused connection returns at once: do not spin

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def _contender(kind: str, *, clients: int, duration: float, where: list[str], logs: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / f"{kind}.log"
    proc = (_start(f"{MODEL}@production", port, where, log, "--canary", f"{MODEL}@2=10%") if kind == "promote"
            else _start(f"{MODEL}@1", port, where, log))
    wait_healthy(url, proc, log)
    with httpx.Client(timeout=60) as warm:  # the first requests pay one-off costs in both contenders
        for s in (False, True, False, True):
            _one(warm, url, "warm-up", s)
    results: list[dict] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    threads = _load(url, clients, t0 + duration, results, lock)
    switches = []
    for at, target in ((duration / 3, 2), (2 * duration / 3, 1)):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        start = time.monotonic()
        if kind == "promote":
            action = "promote" if target == 2 else "rollback"
            r = httpx.post(url + f"/admin/{action}", timeout=120)
            ok = r.status_code == 200 and r.json()["primary"]["version"] == target
        else:
            stop_server(proc)  # SIGTERM: the old server drains its requests in flight, then exits
            proc = _start(f"{MODEL}@{target}", port, where, log)
            wait_healthy(url, proc, log)
            ok = True
        switches.append({"to": target, "start": start - t0, "seconds": time.monotonic() - start, "ok": ok})
    for t in threads:
        t.join(120)
    stop_server(proc)
    return _summary(results, switches, t0)


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0, "p50_ms": None, "p95_ms": None}
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return {"n": len(xs), "p50_ms": 1000 * statistics.median(xs), "p95_ms": 1000 * p95}


def _summary(results: list[dict], switches: list[dict], t0: float) -> dict:
    windows = [(t0 + s["start"], t0 + s["start"] + s["seconds"] + SWITCH_WINDOW_S) for s in switches]
    first = windows[0][0]
    phases: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for r in results:
        if not r["ok"]:
            continue
        if any(a <= r["start"] <= b for a, b in windows):
            phase = "during"
        else:
            phase = "before" if r["start"] < first else "after"
        phases[phase].append(r["end"] - r["start"])
    by_version: dict[str, int] = {}
    for r in results:
        if r["ok"]:
            by_version[r["version"]] = by_version.get(r["version"], 0) + 1
    failed = [r for r in results if not r["ok"]]
    return {"requests": len(results), "failed": len(failed), "by_version": dict(sorted(by_version.items())),
            "failures": sorted({(r["error"] or "")[:120] for r in failed})[:5],
            "latency": {k: _percentiles(v) for k, v in phases.items()}, "switches": switches}


# ------------------------------------------------------------------------------ the section

def canary_section(args: argparse.Namespace) -> dict:
    clients = getattr(args, "canary_clients", 8)
    duration = getattr(args, "canary_duration", 60.0)
    hidden = getattr(args, "canary_hidden", 128)
    with tempfile.TemporaryDirectory(prefix="genforge-canary-") as tmp:
        root = Path(tmp)
        where = ["--store", str(root / "state"), "--registry-dir", str(root / "registry")]
        for run in _save_versions(root, hidden):
            _genforge("registry", "push", str(run), "--name", MODEL, *where)
        contenders = {}
        for kind in ("promote", "restart"):
            _genforge("registry", "alias", f"{MODEL}@1", "production", *where)
            contenders[kind] = _contender(kind, clients=clients, duration=duration, where=where, logs=root)
    return {"settings": {"clients": clients, "duration_s": duration, "max_tokens": MAX_TOKENS,
                         "model": f"random Llama hidden {hidden}, 4 layers, vocab 300", "canary_share": 10,
                         "switch_window_s": SWITCH_WINDOW_S, "server_threads": 1, "stream_share": 0.5},
            "contenders": contenders}


def print_canary(result: dict) -> None:
    s = result["settings"]
    print(f"\n### canary: switching versions under load ({s['clients']} clients x {s['duration_s']:g} s, "
          f"{s['max_tokens']} tokens, half streamed; {s['model']})\n")
    rows = []
    for kind, c in result["contenders"].items():
        lat = c["latency"]
        versions = ", ".join(f"{v}: {n}" for v, n in c["by_version"].items())
        rows.append([kind, c["requests"], c["failed"], versions,
                     " / ".join(fmt(s["seconds"], ".2f") for s in c["switches"]),
                     *(f"{fmt(lat[p]['p50_ms'])} / {fmt(lat[p]['p95_ms'])}" for p in ("before", "during", "after"))])
    print(md_table(["switch by", "requests", "failed", "answered by", "switch s (to 2 / back)",
                    "p50/p95 ms before", "during", "after"], rows, "lllllrrr"))
    for kind, c in result["contenders"].items():
        for failure in c["failures"]:
            print(f"  {kind} failure: {failure}")


def main() -> None:
    from _common import cpu_info, git_commit, versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_canary_args(ap)
    a = ap.parse_args()
    result = canary_section(a)
    result.update(cpu=cpu_info(), versions=versions("torch", "transformers", "fastapi", "uvicorn", "httpx"),
                  git_commit=git_commit(ROOT), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print_canary(result)
    path = ROOT / "benchmarks" / "results" / "scale_canary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
