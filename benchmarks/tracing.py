"""What tracing costs `genforge serve`: throughput with --trace off, console (to a file) and otlp (to a local receiver).

    .venv/bin/python benchmarks/tracing.py [--rounds 5] [--requests 128]
    .venv/bin/python benchmarks/tracing.py --quick        # 1 round, a small load: checks the script
    .venv/bin/python benchmarks/tracing.py --span-cost    # only the in-process cost of a request's spans

The load and the server are serve_throughput.py's (its helpers run them): genforge serve as it starts
by default, 16 concurrent clients streaming greedy completions of ~32-token pydoc prompts, 64 new
tokens each with EOS ignored. The model is lm-tiny with random weights by default (`--train-steps 0`:
throughput does not depend on the weights' values; a trained one with `--model`). Rows:
- off: `--trace off` (the default: no OpenTelemetry SDK imported, every span call a no-op);
- console: `--trace console`, the server's stdout (one JSON line per span) redirected to a file;
- otlp: `--trace otlp` to an OTLP/HTTP receiver in a process of its own that decodes every
  ExportTraceServiceRequest (as a collector would) and counts the spans.
Each row is its own server process, started fresh every round, one server at a time, warmed up with
one pass before the timed one; rows rotate order from round to round (interleaved), medians over the
rounds. The spans each traced server exported are counted, so a row that traced nothing would show;
the server's CPU time per request over the timed pass (psutil) is recorded beside the throughput,
as a figure less disturbed by other work on a shared machine.
`--span-cost` measures, in this process, the CPU one request's spans take (a root and the 6 other
spans a plain chat request records, created and exported as console JSON to /dev/null) and adds it
to the JSON: a figure the machine's other work hardly moves.
Writes benchmarks/results/tracing.json (tracing_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, git_commit, md_table, median, versions  # noqa: E402
from serve_throughput import (  # noqa: E402
    LOGS,
    RESULTS,
    ROOT,
    Contender,
    Server,
    body_for,
    ensure_model,
    free_port,
    make_prompts,
    run_http,
)

ROWS = ("off", "console", "otlp")


def _receive(port: int, spans, ready) -> None:
    """An OTLP/HTTP trace receiver: decodes each request and counts its spans in `spans` (a shared int)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    reply = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            req = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["content-length"])))
            with spans.get_lock():
                spans.value += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    ready.set()
    server.serve_forever()


def server_cpu_s(pid: int) -> float:
    """CPU seconds the server process (and its children) used so far: less disturbed than throughput
    by whatever else runs on the machine."""
    import psutil

    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def span_cost_us(n: int = 3000) -> float:
    """CPU microseconds per request for 7 spans through the SDK and the console exporter (to /dev/null)."""
    import contextlib
    import os

    from genforge.common import tracing

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        tracing.setup_tracing("console")  # its exporter writes to sys.stdout as it is now: /dev/null
        started = time.process_time()
        for i in range(n):
            if i % 100 == 0:
                tracing.flush()  # keep the batch queue from overflowing (it would drop spans unexported)
            with tracing.server_span("POST /v1/chat/completions", [], {"genforge.request_id": "x" * 32}):
                t0 = time.perf_counter()
                for name in ("validate", "chat lm-tiny", "queue_wait", "prefill", "decode", "respond"):
                    tracing.record_span(name, t0, t0 + 0.001, {"gen_ai.usage.input_tokens": 32,
                                                               "gen_ai.usage.output_tokens": 64})
        tracing.flush()
        return 1e6 * (time.process_time() - started) / n


def console_spans(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if line.startswith('{"name"'))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a run directory or HF folder (default: lm-tiny, random weights)")
    ap.add_argument("--train-steps", type=int, default=0, help="steps for the default lm-tiny (0: random weights)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="1 round, 16 requests x 16 tokens")
    ap.add_argument("--span-cost", action="store_true", help="only the in-process span cost, added to the JSON")
    a = ap.parse_args()
    if a.span_cost:
        us = span_cost_us()
        path = RESULTS / "tracing.json"
        result = json.loads(path.read_text()) if path.is_file() else {"benchmark": "tracing"}
        result["span_cost"] = {"cpu_us_per_request": us, "spans_per_request": 7, "exporter": "console to /dev/null",
                               "measured": "in one process: the SDK's span creation and the batch processor's export"}
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{us:.0f} us of CPU per request for its 7 spans (created and exported); wrote {path}")
        return
    if a.quick:
        a.rounds, a.requests, a.new_tokens, a.warmup = 1, 16, 16, 4
    out_path = RESULTS / ("tracing_quick.json" if a.quick else "tracing.json")
    folder = ensure_model(a.model, a.train_steps)
    prompts, n_prompt = make_prompts(folder, a.warmup + a.requests, a.prompt_tokens)

    ctx = multiprocessing.get_context("spawn")
    received, ready = ctx.Value("q", 0), ctx.Event()
    receiver_port = free_port()
    receiver = ctx.Process(target=_receive, args=(receiver_port, received, ready), daemon=True)
    receiver.start()
    ready.wait(60)

    gf = [sys.executable, "-m", "genforge.cli", "serve", str(folder), "--served-model-name", "lm-tiny", "--port"]

    def command(row: str):
        return lambda port: [*gf, port, "--trace", row]

    contenders = {row: Contender(f"genforge serve --trace {row}", "genforge", command(row), modes=("greedy",))
                  for row in ROWS}
    contenders["otlp"].env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}"}
    records = {row: {"command": None, "tok_s": [], "ttft_p50": [], "e2e_p50": [], "cpu_ms_per_request": [],
                   "spans": [], "spans_per_request": []}
               for row in ROWS}
    bodies = [body_for(contenders["off"], "greedy", p, i, a.new_tokens) for i, p in enumerate(prompts)]
    probe = body_for(contenders["off"], "greedy", prompts[0], 0, a.new_tokens, stream=False)
    try:
        for rnd in range(a.rounds):
            order = list(ROWS[rnd % len(ROWS):] + ROWS[: rnd % len(ROWS)])
            for row in order:
                c, rec = contenders[row], records[row]
                log = LOGS / f"tracing_{row}.log"
                before = received.value
                srv = Server(c, probe, log)
                try:
                    rec["command"] = " ".join(srv.argv[1:])
                    run_http(srv.url, bodies[: a.warmup], a.clients, a.new_tokens)
                    cpu0 = server_cpu_s(srv.proc.pid)
                    res = run_http(srv.url, bodies[a.warmup:], a.clients, a.new_tokens)
                    res["cpu_ms_per_request"] = 1000 * (server_cpu_s(srv.proc.pid) - cpu0) / a.requests
                finally:
                    srv.stop()  # SIGTERM: the server flushes its queued spans on exit
                time.sleep(0.5)  # the receiver's last request
                spans = console_spans(log) if row == "console" else received.value - before if row == "otlp" else 0
                requests = a.warmup + a.requests + 1
                for k in ("tok_s", "ttft_p50", "e2e_p50", "cpu_ms_per_request"):
                    rec[k].append(res[k])
                rec["spans"].append(spans)
                rec["spans_per_request"].append(spans / requests)
                print(f"round {rnd + 1}/{a.rounds} {row}: {res['tok_s']:.0f} tok/s, "
                      f"{res['cpu_ms_per_request']:.1f} server CPU ms/request, {spans} spans "
                      f"({spans / requests:.1f} per request)", flush=True)
    finally:
        receiver.terminate()

    base = median(records["off"]["tok_s"])
    rows = []
    for row in ROWS:
        rec = records[row]
        rec["tok_s_median"] = median(rec["tok_s"])
        rec["overhead_percent"] = 100 * (1 - rec["tok_s_median"] / base)
        rec["cpu_ms_per_request_median"] = median(rec["cpu_ms_per_request"])
        rec["cpu_overhead_percent"] = 100 * (rec["cpu_ms_per_request_median"] /
                                             median(records["off"]["cpu_ms_per_request"]) - 1)
        rows.append([f"--trace {row}", f"{rec['tok_s_median']:.0f}", f"{rec['overhead_percent']:+.1f}%",
                     " ".join(f"{x:.0f}" for x in rec["tok_s"]), f"{rec['cpu_ms_per_request_median']:.1f}",
                     f"{rec['cpu_overhead_percent']:+.1f}%", f"{1000 * median(rec['ttft_p50']):.0f}",
                     f"{median(rec['e2e_p50']):.2f}", f"{median(rec['spans_per_request']):.1f}"])
    table = md_table(["genforge serve", "tok/s (median)", "cost vs off", "tok/s per round",
                      "server CPU ms / request", "CPU vs off", "TTFT p50 ms",
                      "e2e p50 s", "spans / request"], rows)
    print("\n" + table)
    result = {"benchmark": "tracing", "quick": a.quick,
              "load": {"requests": a.requests, "warmup_requests": a.warmup, "clients": a.clients,
                       "new_tokens": a.new_tokens, "prompt_tokens_mean": n_prompt, "mode": "greedy, streamed",
                       "rounds": a.rounds, "order": "one server process per row per round, rows rotated; medians"},
              "model": {"folder": str(folder), "trained_steps_if_built_here": None if a.model else a.train_steps},
              "cpu": cpu_info(), "git": git_commit(ROOT),
              "versions": versions("torch", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "uvicorn"),
              "rows": records, "markdown_table": table}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
