"""Which anomaly detector catches a serving slowdown sooner, at fewer false alarms?

    python benchmarks/alerts.py [--run RUN] [--clean 360 --slow 180 --delay 0.003]   # record, then replay
    python benchmarks/alerts.py --replay-only     # replay benchmarks/results/alerts_stream.jsonl again
    python benchmarks/alerts.py --delay 0.0015 --tag mild   # a second recording: alerts_stream_mild.jsonl, alerts_mild.json

Record: a real `genforge serve` (lm-nano, eager, batch 8) under a load generator (`--clients`
streaming clients, 16-48 new tokens each, sampled, an exponential think time of 0.3 s on
average), with a slowdown injected `--clean` seconds after the recording starts: every engine
iteration sleeps `--delay` s from then on (GENFORGE_TEST_STEP_DELAY, serve/engine.py). Every second
the recorder reads /metrics and keeps the counters serve/alerts.py makes its signals from
(`alerts.snapshot`), written to benchmarks/results/alerts_stream.jsonl. The server runs its own
sampler (defaults: zscore, every 5 s) too; its log lines are kept as a cross-check.

Replay: the recorded counters are cut into samples every `--interval` s (each of the `interval`
one-second phases is a replay of its own), and the samples go through `alerts.Tracker`, the code
the server runs, once per detector and threshold. Per detector: detection delay (first anomaly
started at or after the onset, median over phases), false alarms per hour (anomalies started
before the onset, over all phases' clean time), and the CPU time per sample. The thresholds of the
"default" rows were fixed before the recording (serve/alerts.py AlertSpec); the sweep rows are on
this same recording, i.e. tuned on the data they are scored on, and say so.
Writes benchmarks/results/alerts.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, cpu_info, git_commit, md_table, stop_server, versions, wait_healthy  # noqa: E402
from soak import PROMPTS, _genforge, free_port, train_tiny  # noqa: E402

from genforge.common.runs import atomic_write_text  # noqa: E402
from genforge.serve.alerts import AlertSpec, Tracker, signals, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "alerts"
SWEEP = {"zscore": [3.0, 4.0, 5.0, 6.0, 8.0, 10.0], "iforest": [0.6, 0.65, 0.7, 0.75, 0.8]}


# ---------------------------------------------------------------- recording


def _client(base: str, stop: threading.Event, seed: int, errors: list) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            body = {"model": MODEL, "prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(16, 48),
                    "temperature": 0.8, "stream": True, "ignore_eos": True}
            try:
                with c.stream("POST", base + "/v1/completions", json=body) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError as e:
                errors.append(repr(e))
            stop.wait(rng.expovariate(1 / 0.3))


def _scrape(base: str) -> dict:
    text = httpx.get(base + "/metrics", timeout=10).text
    return snapshot((s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples)


def record(args: argparse.Namespace) -> dict:
    run = Path(args.run) if args.run else train_tiny(CACHE / "alerts", 200)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = CACHE / "logs" / "alerts-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # the onset is a Unix time fixed now: server start-up + warm-up fit well inside `startup_budget`
    startup_budget = 60.0
    onset = time.time() + startup_budget + args.clean
    env = {**os.environ, "GENFORGE_TEST_STEP_DELAY": f"{args.delay}@{onset:.3f}",
           # this checkout's code, whatever the venv's editable install points at
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [*_genforge(), "serve", str(run), "--port", str(port), "--served-model-name", MODEL, "--max-batch-size",
           "8", "--enforce-eager"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    stop, errors, rows = threading.Event(), [], []
    try:
        wait_healthy(base, proc, log, timeout=startup_budget - 15)
        clients = [threading.Thread(target=_client, args=(base, stop, i, errors), daemon=True)
                   for i in range(args.clients)]
        for t in clients:
            t.start()
        time.sleep(10)  # warm-up: the load settles before the recording starts
        start = time.time()
        if start >= onset:
            raise SystemExit("start-up took longer than the budget; the onset has passed")
        end = onset + args.slow
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task("recording", total=end - start)
            while (now := time.time()) < end:
                rows.append({"t": now, "snap": _scrape(base)})
                bar.update(task, completed=now - start)
                time.sleep(max(0.0, 1.0 - (time.time() - now)))
    finally:
        stop.set()
        stop_server(proc, timeout=30)
    server_lines = [ln for ln in log.read_text(errors="replace").splitlines() if "anomaly" in ln]
    meta = {"start": start, "onset": onset, "end": end, "delay_s": args.delay, "clients": args.clients,
            "client_errors": len(errors), "server_command": cmd, "server_alert_log": server_lines}
    lines = [json.dumps({"meta": meta})] + [json.dumps(r) for r in rows]
    atomic_write_text(stream_path(args.tag), "\n".join(lines) + "\n")
    return meta


# ---------------------------------------------------------------- replay


def stream_path(tag: str) -> Path:
    return RESULTS / f"alerts_stream{'_' + tag if tag else ''}.jsonl"


def load_stream(tag: str) -> tuple[dict, list[dict]]:
    lines = [json.loads(ln) for ln in stream_path(tag).read_text().splitlines() if ln.strip()]
    return lines[0]["meta"], lines[1:]


class _Scored(Tracker):
    """A Tracker that remembers every score it computed (and the CPU time), keyed by (signal, t):
    the window holds every sample whatever the state, so a score does not depend on the threshold,
    and the threshold sweep reuses them instead of refitting forests."""

    def __init__(self, spec: AlertSpec, cache: dict, cpu: list):
        super().__init__(spec)
        self.cache, self.cpu = cache, cpu

    def score(self, name, history, x):
        key = (name, self._t)
        if key not in self.cache:
            t0 = time.process_time()
            self.cache[key] = super().score(name, history, x)
            self.cpu[0] += time.process_time() - t0
        return self.cache[key]

    def update(self, t, values):
        self._t = t
        return super().update(t, values)


def replay(meta: dict, rows: list[dict], spec: AlertSpec, interval: int, cache: dict) -> dict:
    """Every phase's samples through a fresh Tracker: delays, false alarms, CPU per sample.
    `cache`: scores by (detector, window, phase) from an earlier threshold of the same detector."""
    onset = meta["onset"]
    delays, false_alarms, clean_s, cpu, samples, signals_hit, clean_max = [], 0, 0.0, [0.0], 0, {}, 0.0
    for phase in range(interval):
        picked = rows[phase::interval]
        tracker = _Scored(spec, cache.setdefault((spec.detector, spec.window, phase), {}), cpu)
        first = None
        for prev, cur in zip(picked, picked[1:]):
            changes = tracker.update(cur["t"], signals(prev["snap"], cur["snap"], cur["t"] - prev["t"]))
            samples += 1
            for c in changes:
                if not c.active:
                    continue
                if c.t < onset:
                    false_alarms += 1
                elif first is None:
                    first = c.t - onset
                    signals_hit[c.signal] = signals_hit.get(c.signal, 0) + 1
        delays.append(first)
        clean_s += max(0.0, onset - picked[0]["t"])
        clean_max = max([clean_max, *(v for (_, t), v in tracker.cache.items() if t < onset)])
    caught = [d for d in delays if d is not None]
    return {"detector": spec.detector, "threshold": spec.threshold, "interval_s": interval, "window": spec.window,
            "consecutive": spec.consecutive, "phases": interval, "detected": f"{len(caught)}/{len(delays)}",
            "delay_s_median": statistics.median(caught) if caught else None, "delays_s": delays,
            "first_signal": signals_hit, "false_alarms": false_alarms,
            "false_alarms_per_hour": false_alarms / (clean_s / 3600) if clean_s else None,
            "clean_hours": clean_s / 3600, "max_clean_score": clean_max, "cpu_s_scoring": cpu[0], "samples": samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="run dir / HF folder to serve (default: train lm-nano, cached)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--clean", type=float, default=360.0, help="seconds recorded before the slowdown")
    p.add_argument("--slow", type=float, default=180.0, help="seconds recorded during the slowdown")
    p.add_argument("--delay", type=float, default=0.003, help="seconds every engine iteration sleeps in the slowdown")
    p.add_argument("--interval", type=int, default=5, help="sample interval of the replay (whole seconds)")
    p.add_argument("--window", type=int, default=AlertSpec().window)
    p.add_argument("--replay-only", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the stream and result files (a second scenario)")
    args = p.parse_args(argv)

    if not args.replay_only:
        record(args)
    meta, rows = load_stream(args.tag)
    results, cache = [], {}
    for detector, thresholds in SWEEP.items():
        default = AlertSpec(detector=detector).threshold
        for th in sorted(set(thresholds) | {default}):
            key = "zscore_threshold" if detector == "zscore" else "iforest_threshold"
            spec = AlertSpec(detector=detector, window=args.window, **{key: th})
            r = replay(meta, rows, spec, args.interval, cache)
            r["row"] = "default (fixed before recording)" if th == default else "sweep (tuned on this recording)"
            results.append(r)
    cpu_ms = {d: 1000 * max(r["cpu_s_scoring"] for r in results if r["detector"] == d) /
              max(r["samples"] for r in results if r["detector"] == d) for d in SWEEP}
    for r in results:  # the first threshold of each detector computed (and timed) all the scores
        r["cpu_ms_per_sample"] = cpu_ms[r["detector"]]
    chosen = {d: min((r for r in results if r["detector"] == d and r["row"].startswith("default")),
                     key=lambda r: r["threshold"]) for d in SWEEP}
    headers = ["detector", "threshold", "row", "detected", "delay after onset (s, median)", "false alarms / h",
               "highest score on the clean stretch", "CPU ms / sample"]
    table = md_table(headers, [[r["detector"], f"{r['threshold']:g}", r["row"], r["detected"],
                                None if r["delay_s_median"] is None else f"{r['delay_s_median']:.0f}",
                                f"{r['false_alarms_per_hour']:.1f}", f"{r['max_clean_score']:.3g}",
                                f"{r['cpu_ms_per_sample']:.2f}"] for r in results], align="lrlrrrrr")
    clean_min, slow_min = (meta["onset"] - meta["start"]) / 60, (meta["end"] - meta["onset"]) / 60
    head = (f"genforge serve (lm-nano, {meta['clients']} streaming clients): {clean_min:.1f} min clean, then every "
            f"engine iteration sleeps {meta['delay_s'] * 1000:g} ms for {slow_min:.1f} min; samples every "
            f"{args.interval} s, window {args.window}, {AlertSpec().consecutive} consecutive samples to start; "
            f"{args.interval} replays (one per 1-s phase)")
    print(head)
    print(table)
    print("server's own sampler (zscore, 5 s):", *meta["server_alert_log"], sep="\n  ")
    out = {"setup": head, "meta": {k: v for k, v in meta.items()}, "results": results,
           "default_rows": chosen, "table": table, "cpu": cpu_info(), "commit": git_commit(ROOT),
           "versions": versions("torch", "scikit-learn", "numpy", "prometheus-client")}
    atomic_write_text(RESULTS / f"alerts{'_' + args.tag if args.tag else ''}.json", json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
