"""benchmarks/scale.py's "distributed" section (run it as `benchmarks/scale.py --only distributed`).

Section "distributed": one recipe trained by `genforge train` on 1 process and on 2 processes started by
torchrun (DDP, and FSDP2), each contender a process (group) of its own, one after the other, `--rounds`
times in turn. Model: the lm-nano preset (hidden 128, 4 layers, context 256, ~0.8M parameters, random
init), char-level tokens of the CPython docs (`pydoc_data.topics`), global batch `--batch-size`
sequences of 256 tokens, fp32, AdamW, no eval during the timed steps. The recipe's batch is the global
batch, so every contender takes the same steps on the same data. Throughput is taken from the run's
metrics.jsonl `elapsed` (rank 0's clock): sequences (samples) and tokens per second over the steps
after `--warmup`, i.e. without process start-up, imports and the first steps. Contenders:
  1 proc x 1 thread     genforge train, train.threads 1
  1 proc x N threads    genforge train, train.threads N (every core in one process)
  N procs x 1 thread    torchrun --nproc-per-node N -m genforge train, DDP over gloo
  N procs x 1 thread    ... with train.parallel: fsdp
On a machine with N cores, "N processes x 1 thread" against "1 process x N threads" is the comparison
that tells whether data parallelism beats intra-op threading for this model size.

"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, free_port, md_table, median  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONTEXT = 256


def _char_dataset(root: Path) -> Path:
    from pydoc_data.topics import topics

    from genforge.data.tokens import prepare_text_dataset

    text = "\n\n".join(topics[k] for k in sorted(topics))
    (root / "docs.txt").write_text(text, encoding="utf-8")
    prepare_text_dataset(str(root / "docs.txt"), str(root / "ds"), tokenizer="char", val_fraction=0.05,
                         doc_split="file")
    return root / "ds"


def _recipe(root: Path, dataset: Path, steps: int, batch_size: int) -> Path:
    path = root / "scale.yaml"
    path.write_text(f"""name: scale
family: lm
dataset: {dataset}
out_dir: {root / 'runs'}
model: {{preset: lm-nano}}
train: {{max_steps: {steps}, batch_size: {batch_size}, lr: 1e-3, warmup_steps: 5, precision: fp32,
         device: cpu, eval_every: {steps}, eval_batches: 1, log_every: 1, checkpoint_every: {steps}, seed: 0}}
""")
    return path


def _train(recipe: Path, name: str, nproc: int, threads: int, parallel: str) -> list[dict]:
    """One contender in a process (group) of its own; its metrics.jsonl rows."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    args = ["train", str(recipe), "--set", f"name={name}", "--set", f"train.threads={threads}",
            "--set", f"train.parallel={parallel}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "genforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "genforge", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    rows = (recipe.parent / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r) for r in rows]


def _throughput(rows: list[dict], warmup: int, batch_size: int) -> dict:
    by_step = {r["step"]: r for r in rows if "loss" in r}
    last = max(by_step)
    seconds = by_step[last]["elapsed"] - by_step[warmup]["elapsed"]
    samples = (last - warmup) * batch_size
    return {"samples_per_s": samples / seconds, "tokens_per_s": samples * CONTEXT / seconds,
            "timed_steps": last - warmup, "final_loss": by_step[last]["loss"]}


def section_distributed(a: argparse.Namespace) -> dict:
    if a.quick:
        a.steps, a.warmup, a.rounds = 3, 2, 1
    cores = os.cpu_count() or 1
    n = max(2, cores) if a.nproc is None else a.nproc
    contenders = [("1 proc x 1 thread", 1, 1, "ddp"), (f"1 proc x {n} threads", 1, n, "ddp"),
                  (f"{n} procs x 1 thread, DDP", n, 1, "ddp"), (f"{n} procs x 1 thread, FSDP", n, 1, "fsdp")]
    results: dict[str, list[dict]] = {c[0]: [] for c in contenders}
    with tempfile.TemporaryDirectory(prefix="genforge-scale-") as tmp:
        root = Path(tmp)
        recipe = _recipe(root, _char_dataset(root), a.warmup + a.steps, a.batch_size)
        for r in range(a.rounds):
            for i, (label, nproc, threads, parallel) in enumerate(contenders):
                rows = _train(recipe, f"c{i}-r{r}", nproc, threads, parallel)
                results[label].append(_throughput(rows, a.warmup, a.batch_size))
                print(f"round {r + 1}: {label}: {results[label][-1]['samples_per_s']:.1f} samples/s", flush=True)
    base = median([x["samples_per_s"] for x in results[contenders[0][0]]])
    rows, table = [], []
    for label, nproc, threads, parallel in contenders:
        sps = median([x["samples_per_s"] for x in results[label]])
        tps = median([x["tokens_per_s"] for x in results[label]])
        rows.append({"contender": label, "processes": nproc, "threads_per_process": threads,
                     "parallel": parallel if nproc > 1 else "none", "samples_per_s": sps, "tokens_per_s": tps,
                     "speedup_vs_1x1": sps / base, "rounds": results[label]})
        table.append([label, fmt(sps, ".1f"), fmt(tps, ",.0f"), fmt(sps / base, ".2f") + "x",
                      fmt(results[label][-1]["final_loss"], ".4f")])
    md = md_table(["contender", "samples/s", "tokens/s", "vs 1x1", f"loss at step {a.warmup + a.steps}"], table)
    return {"settings": {"model": "lm-nano (preset)", "context": CONTEXT, "global_batch": a.batch_size,
                         "warmup_steps": a.warmup, "timed_steps": a.steps, "rounds": a.rounds,
                         "precision": "fp32", "backend": "gloo", "dataset": "char-level pydoc_data.topics"},
            "rows": rows, "table": md}


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=40, help="distributed: timed steps per contender")
    p.add_argument("--warmup", type=int, default=5, help="distributed: untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="distributed: every contender this many times, in turn")
    p.add_argument("--batch-size", type=int, default=16, help="distributed: the global batch (sequences)")
    p.add_argument("--nproc", type=int, default=None, help="distributed: processes (default: the cores, >= 2)")
    p.add_argument("--quick", action="store_true", help="distributed: 3 + 2 steps, one round")


def print_distributed(result: dict) -> None:
    print(result["table"])
