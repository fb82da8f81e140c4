"""Micro-benchmark of the fast path's decode step (models/fastdecode.py) on lm-tiny, batch 16.

What it measures, each configuration in a fresh process (compile state and caches do not leak):
- the step: `LlamaRunner.decode` of 16 rows, fp32 / bf16 x eager / compiled / compiled with
  freeze=True (inductor freezing: oneDNN-prepacked weights, a second copy of them) / prepacked
  (prepack=True: the weights only in oneDNN's layout, eager, one copy);
- an engine loop: BatchGenerator add/step over 64 requests (prompts of 20-35 tokens, 64 new
  tokens, T 0.7), at most 16 rows at once: tokens per CPU second, prefill included;
- start-up: `LlamaRunner(compile=...)` construction, cold (empty inductor cache folder) and warm
  (the same folder again), wall and CPU time (this process + its compile workers);
- memory: resident set growth from the loaded model to the runner with 16 decoding rows;
- where one `BatchGenerator.step()` goes (16 sampled rows, T 0.7): the transformer (`step_fn`),
  the rest of `runner.decode` (input tensors, RoPE tables, mask), the sampler, `Sequence.accept`
  (detokenization, stop handling) and the remaining Python bookkeeping.

Method: one torch thread; per-step CPU time (`time.process_time`) and medians over many steps,
because the machine's cores are shared with other jobs (wall times are noisy; CPU time much less
so). Figures from different runs are not compared: only rows of one run. Writes
benchmarks/results/decode_step.json with the CPU flags, torch version and threads.

    .venv/bin/python benchmarks/decode_step.py [--steps 200] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, cpu_info, git_commit, md_table  # noqa: E402

BATCH = 16
PROMPT = 24


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_all() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def worker(cfg: dict) -> dict:
    """One configuration in this (fresh) process."""
    t_import = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    from genforge.models.fastdecode import LlamaRunner
    from genforge.models.lm import load_lm

    import_s = time.perf_counter() - t_import
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg["dtype"]]
    model, tok = load_lm(cfg["model"], dtype=dtype)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rss0 = _rss_mib()
    w0, c0 = time.perf_counter(), _cpu_all()
    compile_arg = {"eager": False, "compiled": True, "frozen": True, "background": "background",
                   "prepacked": False}[cfg["mode"]]
    if cfg.get("engine"):
        return {"engine_tok_per_cpu_s": engine_loop(model, tok, cfg["mode"])}
    runner = LlamaRunner(model, max_len=256, slots=BATCH, compile=compile_arg, freeze=cfg["mode"] == "frozen",
                         prepack=cfg["mode"] == "prepacked")
    out = {"construct_wall_s": time.perf_counter() - w0, "construct_cpu_s": _cpu_all() - c0,
           "import_s": import_s, "compiled": runner.compiled}
    if cfg.get("startup_only"):
        return out
    prompts = [[5 + (7 * i + j) % 4000 for j in range(PROMPT)] for i in range(BATCH)]
    runner.prefill(0, prompts)
    toks, ts = [7] * BATCH, []
    for k in range(cfg["steps"]):
        c = time.process_time()
        runner.decode(toks, [PROMPT + k] * BATCH)
        ts.append(time.process_time() - c)
    ts = ts[10:]
    out.update(step_ms=statistics.median(ts) * 1e3, step_p25_ms=statistics.quantiles(ts, n=4)[0] * 1e3,
               rss_growth_mib=_rss_mib() - rss0, rss_mib=_rss_mib(), kv_mib=runner.cache.nbytes() / 2**20,
               weights_mib=weights_mib)
    if cfg.get("breakdown"):
        del runner  # prepack=True took the model's weights: a fresh copy of the model for the generator
        model, tok = load_lm(cfg["model"], dtype=dtype)
        out["breakdown"] = breakdown(model, tok, cfg["steps"], cfg["mode"])
    return out


def engine_loop(model, tok, mode: str) -> float:
    """Tokens per CPU second of BatchGenerator add/step over 64 requests (after one warm-up pass)."""
    from genforge.models.fastdecode import LlamaRunner
    from genforge.models.generation import BatchGenerator
    from genforge.models.sampling import SamplingParams

    gen = BatchGenerator(model, tok, max_batch_size=BATCH, compile=mode == "compiled", prepack=mode == "prepacked")
    if mode == "frozen":
        gen.runner = LlamaRunner(model, max_len=gen.max_model_len, slots=8, compile=True, freeze=True)

    def once() -> int:
        queue = [[5 + (13 * i + j) % 4000 for j in range(20 + i % 16)] for i in range(64)]
        params = SamplingParams(max_new_tokens=64, temperature=0.7, ignore_eos=True)
        n = 0
        while queue or gen.rows:
            if queue and gen.free_slots:
                n += len(gen.add([gen.new_sequence(queue.pop(0), params)
                                  for _ in range(min(gen.free_slots, len(queue)))]))
            n += len(gen.step())
        return n

    once()
    c = time.process_time()
    n = once()
    return n / (time.process_time() - c)


def breakdown(model, tok, steps: int, mode: str) -> dict:
    """Per-phase CPU time of BatchGenerator.step() with 16 sampled rows (medians, ms)."""
    from genforge.models import generation
    from genforge.models.generation import BatchGenerator
    from genforge.models.sampling import SamplingParams

    gen = BatchGenerator(model, tok, max_batch_size=BATCH, max_model_len=256, compile=mode == "compiled",
                         prepack=mode == "prepacked")
    acc: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            c = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.process_time() - c
        return wrapper

    runner = gen.runner
    runner.step_fn = timed("transformer", runner.step_fn)
    if mode == "eager":
        runner.core = runner.step_fn  # decode() tells eager from compiled by identity
    runner.decode = timed("decode", runner.decode)
    gen.sampler = timed("sampler", gen.sampler)
    generation.Sequence.accept = timed("accept", generation.Sequence.accept)
    params = SamplingParams(max_new_tokens=256 - PROMPT, temperature=0.7, ignore_eos=True)
    gen.add([gen.new_sequence([5 + (7 * i + j) % 4000 for j in range(PROMPT)], params) for i in range(BATCH)])
    rows: dict[str, list[float]] = {}
    for k in range(min(steps, 256 - PROMPT - 2)):
        acc.clear()
        c = time.process_time()
        gen.step()
        total = time.process_time() - c
        if k < 10:
            continue
        phases = {"transformer (step_fn)": acc["transformer"],
                  "decode inputs (tensors, RoPE, mask)": acc["decode"] - acc["transformer"],
                  "sampler": acc["sampler"], "accept (detokenize, stops)": acc["accept"],
                  "other Python (step, _sample)": total - acc["decode"] - acc["sampler"] - acc["accept"],
                  "total": total}
        for name, v in phases.items():
            rows.setdefault(name, []).append(v * 1e3)
    return {name: statistics.median(v) for name, v in rows.items()}


def run(cfg: dict, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-800:]}


def default_model() -> str:
    folder = CACHE / "runs" / "lm-tiny-0" / "model"
    if not (folder / "config.json").is_file():
        from serve_throughput import random_lm_tiny

        random_lm_tiny(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--model", default=None, help="an HF folder (default: random-weight lm-tiny, as serve_throughput)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    model = a.model or default_model()
    import torch

    from genforge.models.lm import cpu_has_fast_bf16

    steps = []
    cache_dir = tempfile.mkdtemp(prefix="gf-inductor-")
    for dtype in ("fp32", "bf16"):
        for mode in ("eager", "compiled", "frozen", "prepacked"):
            r = run({"model": model, "dtype": dtype, "mode": mode, "steps": a.steps, "breakdown": mode != "frozen"},
                    {"TORCHINDUCTOR_CACHE_DIR": cache_dir})
            e = run({"model": model, "dtype": dtype, "mode": mode, "engine": True},
                    {"TORCHINDUCTOR_CACHE_DIR": cache_dir})
            r.update(dtype=dtype, mode=mode, engine_tok_per_cpu_s=e.get("engine_tok_per_cpu_s"))
            steps.append(r)
            print(f"{dtype} {mode}: {r.get('step_ms', float('nan')):.2f} ms/step {r.get('error', '')}", flush=True)
    startup = []
    for dtype in ("fp32", "bf16"):
        for mode in ("compiled", "frozen", "background"):
            fresh = tempfile.mkdtemp(prefix="gf-inductor-")
            for state in ("cold", "warm"):
                r = run({"model": model, "dtype": dtype, "mode": mode, "startup_only": True},
                        {"TORCHINDUCTOR_CACHE_DIR": fresh})
                r.update(dtype=dtype, mode=mode, cache=state)
                startup.append(r)
                print(f"start-up {dtype} {mode} {state}: {r.get('construct_wall_s', float('nan')):.1f} s wall, "
                      f"{r.get('construct_cpu_s', float('nan')):.1f} s CPU {r.get('error', '')}", flush=True)
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    print("\n## Decode step, batch 16 (median CPU ms per step; one thread)\n")
    print(md_table(["dtype", "mode", "step ms", "p25 ms", "tok/s (16/step)", "engine loop tok/CPU-s",
                    "RSS growth MiB", "weights MiB", "KV MiB"],
                   [[r["dtype"], r["mode"], f(r.get("step_ms")), f(r.get("step_p25_ms")),
                     f(BATCH / r["step_ms"] * 1e3, 0) if r.get("step_ms") else "-",
                     f(r.get("engine_tok_per_cpu_s"), 0), f(r.get("rss_growth_mib"), 0),
                     f(r.get("weights_mib"), 0), f(r.get("kv_mib"), 0)] for r in steps]))
    print("\n## Start-up: LlamaRunner construction (fresh process each; cold = empty inductor cache)\n")
    print(md_table(["dtype", "mode", "cache", "wall s", "CPU s (with compile workers)", "import s", "compiled"],
                   [[r["dtype"], r["mode"], r["cache"], f(r.get("construct_wall_s"), 1),
                     f(r.get("construct_cpu_s"), 1), f(r.get("import_s"), 1), str(r.get("compiled"))]
                    for r in startup]))
    print("\n## One BatchGenerator.step(), 16 sampled rows (median CPU ms per phase)\n")
    names = [n for r in steps if "breakdown" in r for n in r["breakdown"]]
    names = list(dict.fromkeys(names))
    brows = [r for r in steps if "breakdown" in r]
    print(md_table(["phase", *[f"{r['dtype']} {r['mode']}" for r in brows]],
                   [[n, *[f(r["breakdown"].get(n)) for r in brows]] for n in names]))
    out = {"benchmark": "decode_step", "batch": BATCH, "prompt_tokens": PROMPT, "steps": a.steps, "model": model,
           "method": "one torch thread; per-step CPU time (time.process_time), medians; each row a fresh process; "
                     "start-up CPU includes compile worker processes (RUSAGE_CHILDREN)",
           "threads": 1, "torch": torch.__version__, "cpu": cpu_info(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_fast_bf16(),
           "git_commit": git_commit(ROOT), "steps_rows": steps, "startup_rows": startup,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_step.json").write_text(json.dumps(out, indent=1))
    print(f"\nwrote {RESULTS / 'decode_step.json'}")


if __name__ == "__main__":
    main()
