"""Decode throughput of the model-variety presets: the MoE preset on the batched fast path vs the HF
row-at-a-time fallback vs a dense model of the same ACTIVE parameters per token; the state-space
preset (Mamba2) batched vs row at a time.

Contenders, each in a fresh process (nothing leaks between them), all fp32, one torch thread,
random weights (speed does not depend on training; routing of random weights spreads tokens over
the experts about evenly):
- moe batched:   lm-moe-tiny (Mixtral, 4 experts, top-2, expert width 512) in LlamaRunner: attention
                 fused and prepacked (`genforge serve`'s default decode mode), each MoE layer the
                 model's own sparse block on all rows at once
- moe batched, experts eager: the same, with transformers' `eager` experts kernel (a loop over the
                 experts hit) instead of its default `grouped_mm`
- moe HF:        the same model in HFRunner: the model's forward, one row at a time
- dense active:  a Llama with lm-moe-tiny's attention and one MLP of width 2 x 512 = 1024, i.e. the
                 parameters a MoE token runs through (minus the 4 x 256 router), on the same fast path
- mamba batched: lm-mamba-tiny (Mamba2) in StateSpaceRunner (one forward of the HF model per step)
- mamba HF:      the same model in HFRunner

Method: for 1, 4 and 16 rows, the rows are prefilled (24-token prompts), then BatchGenerator.step()
runs greedy decode steps (sampling and detokenization included); after a warm-up the median CPU
time of a step (`time.process_time`: the cores are shared, CPU time is steadier than wall time)
gives tokens/s = rows / step time; wall tokens/s is recorded too. Writes
benchmarks/results/moe_serving.json with the CPU, versions and settings.

    .venv/bin/python benchmarks/moe_serving.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, cpu_info, git_commit, md_table, versions  # noqa: E402

ROWS = (1, 4, 16)
PROMPT = 24
WARMUP = 5
# name -> (model folder, BatchGenerator options)
CONTENDERS = {
    "moe batched (fast path)": ("lm-moe-tiny", {"prepack": True}),
    "moe batched, experts eager": ("lm-moe-tiny", {"prepack": True, "experts": "eager"}),
    "moe HF row-at-a-time": ("lm-moe-tiny", {"fast": False}),
    "dense, same active params": ("dense-active", {"prepack": True}),
    "mamba2 batched": ("lm-mamba-tiny", {}),
    "mamba2 HF row-at-a-time": ("lm-mamba-tiny", {"fast": False}),
}
DENSE_ACTIVE = {"preset": "lm-nano", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                "intermediate_size": 1024, "context_length": 256}  # lm-moe-tiny's attention, 2 x 512 MLP


def build_models(folder: Path) -> dict[str, dict]:
    """The three random-weight models (one 4096-piece byte-BPE tokenizer); their parameter counts."""
    import torch

    from genforge.common.config import from_dict
    from genforge.data.text import load_documents
    from genforge.data.tokenizer import train_tokenizer
    from genforge.models.lm import LMSpec, build_lm_config, count_parameters, create_lm, save_lm

    specs = {"lm-moe-tiny": {"preset": "lm-moe-tiny"}, "dense-active": DENSE_ACTIVE,
             "lm-mamba-tiny": {"preset": "lm-mamba-tiny"}}
    tok = None
    out = {}
    for name, spec in specs.items():
        path = folder / name
        torch.manual_seed(0)
        if tok is None:
            tok = train_tokenizer(load_documents("builtin:pydoc"), "byte-bpe", 4096)
        model = create_lm(build_lm_config(from_dict(LMSpec, spec, "model"), tok))
        if not (path / "config.json").is_file():
            save_lm(model, tok, path)
        total = count_parameters(model)
        active = total
        cfg = model.config
        if getattr(cfg, "num_local_experts", None):  # a token runs top-k of the experts
            per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
            idle = cfg.num_local_experts - cfg.num_experts_per_tok
            active = total - cfg.num_hidden_layers * idle * per_expert
        out[name] = {"path": str(path), "architecture": type(model).__name__, "parameters": total,
                     "active_parameters_per_token": active, "spec": spec}
    return out


def moe_timer(model) -> list[float]:
    """Hooks that add the CPU time spent inside the model's sparse MoE blocks to the returned cell."""
    total = [0.0]
    layers = getattr(getattr(model, "model", None), "layers", [])
    for block in (lay.mlp for lay in layers if hasattr(lay.mlp, "experts")):
        block.register_forward_pre_hook(lambda mod, args: setattr(mod, "_t0", time.process_time()))
        block.register_forward_hook(lambda mod, args, out: total.__setitem__(0, total[0] + time.process_time()
                                                                               - mod._t0))
    return total


def worker(cfg: dict) -> dict:
    """One contender in this (fresh) process: step times at each batch size."""
    import torch

    torch.set_num_threads(1)
    from genforge.models.generation import BatchGenerator
    from genforge.models.lm import load_lm
    from genforge.models.sampling import SamplingParams

    model, tok = load_lm(cfg["model"])
    options = dict(cfg["options"])
    if "experts" in options:  # transformers' experts kernels: grouped_mm (its default here) or eager (a loop)
        model.set_experts_implementation(options.pop("experts"))
    gen = BatchGenerator(model, tok, max_batch_size=max(ROWS), **options)
    out = {"runner": type(gen.runner).__name__, "fast_path": gen.fast_path, "batched": gen.batched,
           "experts_implementation": getattr(model.config, "_experts_implementation", None), "rows": {}}
    steps = cfg["steps"]
    params = SamplingParams(max_new_tokens=WARMUP + steps + 2, temperature=0, ignore_eos=True)
    in_moe = moe_timer(model)
    for n in ROWS:
        prompts = [[5 + (7 * i + j) % 4000 for j in range(PROMPT)] for i in range(n)]
        gen.add([gen.new_sequence(p, params) for p in prompts])
        while gen.num_prefilling:
            gen.step()
        cpu, wall, moe = [], [], []
        for k in range(WARMUP + steps):
            in_moe[0] = 0.0
            c, w = time.process_time(), time.perf_counter()
            events = gen.step()
            if k >= WARMUP:
                cpu.append(time.process_time() - c)
                wall.append(time.perf_counter() - w)
                moe.append(in_moe[0])
            assert len(events) == n, "every row decodes a token each step"
        gen.reset()
        step_cpu, step_wall = statistics.median(cpu), statistics.median(wall)
        out["rows"][str(n)] = {"step_cpu_ms": step_cpu * 1e3, "step_wall_ms": step_wall * 1e3,
                               "tok_per_cpu_s": n / step_cpu, "tok_per_wall_s": n / step_wall,
                               "moe_blocks_cpu_ms": statistics.median(moe) * 1e3}
    return out


def run(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, cwd=ROOT,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-800:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(a.worker))), flush=True)
        return
    models = build_models(CACHE / "runs" / "moe-serving")
    results = {}
    for name, (model, options) in CONTENDERS.items():
        r = run({"model": models[model]["path"], "options": options, "steps": a.steps})
        results[name] = {"model": model, "options": options, **r}
        speeds = r.get("error") or {n: round(v["tok_per_cpu_s"]) for n, v in r["rows"].items()}
        print(f"{name}: {speeds}", flush=True)

    def cell(name: str, n: int, key: str = "tok_per_cpu_s") -> str:
        r = results[name]
        return "error" if "error" in r else f"{r['rows'][str(n)][key]:.0f}"

    print("\n## Decode tokens/s by concurrent rows (per CPU second, one thread; fp32, random weights)\n")
    rows_label = [f"{n} row{'s' if n > 1 else ''}" for n in ROWS]
    print(md_table(["contender", "runner", "params (active/token)", *rows_label,
                    *[f"{n}, wall" for n in ROWS]],
                   [[name, results[name].get("runner", "-"),
                     f"{models[m]['parameters'] / 1e6:.2f}M "
                     f"({models[m]['active_parameters_per_token'] / 1e6:.2f}M)",
                     *[cell(name, n) for n in ROWS], *[cell(name, n, "tok_per_wall_s") for n in ROWS]]
                    for name, (m, _) in CONTENDERS.items()]))
    moe_rows = [name for name, (m, _) in CONTENDERS.items()
                if m == "lm-moe-tiny" and "error" not in results[name]]
    print("\n## Where a MoE decode step goes: CPU ms per step in the model's sparse MoE blocks (4 layers)\n")
    print(md_table(["contender", *[f"{label}: MoE / step ms" for label in rows_label]],
                   [[name, *[f"{results[name]['rows'][str(n)]['moe_blocks_cpu_ms']:.2f} / "
                             f"{results[name]['rows'][str(n)]['step_cpu_ms']:.2f}" for n in ROWS]]
                    for name in moe_rows]))
    import torch

    out = {"benchmark": "moe_serving", "rows": list(ROWS), "prompt_tokens": PROMPT, "warmup_steps": WARMUP,
           "steps": a.steps, "dtype": "float32", "threads": 1, "models": models, "results": results,
           "method": "each contender a fresh process; BatchGenerator.step() with n decoding rows, greedy; "
                     "median CPU time (time.process_time) and wall time of a step after warm-up; "
                     "tokens/s = n / step time",
           "torch": torch.__version__, "versions": versions("torch", "transformers"), "cpu": cpu_info(),
           "git_commit": git_commit(ROOT), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "moe_serving.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(RESULTS / "moe_serving.json")
    print(f"\nwrote {RESULTS / 'moe_serving.json'}")


if __name__ == "__main__":
    main()
