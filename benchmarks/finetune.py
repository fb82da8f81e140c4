"""Fine-tuning on a CPU: genforge's LoRA and full fine-tuning against the plain peft + transformers loop a
user would write, quantized against fp models, and many adapters served against the base.

    .venv/bin/python benchmarks/finetune.py [--steps 20] [--warmup 5] [--rounds 2] [--threads 1]
    .venv/bin/python benchmarks/finetune.py --quick      # a few steps, one round, no serving: checks the script

(a) Training. Model: lm-tiny (11M parameters) with random weights (a step's time and memory do not
    depend on the weights' values; benchmarks/serve_throughput.py builds it). Data: the
    builtin:pydoc-instructions conversations, tokenized once by genforge's chat encoding (labels on
    the assistant's tokens), batches of `--batch-size` padded to the longest row (at most
    `--max-length` tokens); every contender gets the same batches in the same order. fp32, AdamW,
    `--threads` intra-op threads, LoRA r 16, alpha 32, dropout 0.05 on all linear layers. Each
    contender runs in a process of its own, `--warmup` steps untimed then `--steps` timed; peak RSS
    is the process's ru_maxrss when training ends (imports, model, data, optimizer state,
    activations: the whole process), "of which training" that minus the RSS once the model and data
    were loaded, before the optimizer was made. glibc's malloc serves tensors under its dynamic mmap
    threshold (up to 32 MiB) from its heap, whose fragmentation depends on what the process
    allocated before: the same plain loop measured 1485 to 1598 MiB in processes that differed only
    in incidental set-up code. So each contender also runs once more with
    MALLOC_MMAP_THRESHOLD_=131072 ("live peak"): every tensor of 128 KiB or more is then a mapping
    of its own, returned when freed, and the peak RSS follows the live tensors (steps/s is not
    measured there: page faults make that run about 40% slower).
      genforge LoRA / full   `genforge train`'s path: an sft recipe through train/loop.py (steps/s
                             from its metrics.jsonl `elapsed`, logged every step)
      peft + transformers    AutoModelForCausalLM + peft's get_peft_model (LoRA) or the bare model
                             (full), torch.optim.AdamW, `model(**batch).loss.backward(); opt.step()`
(b) Quantization: `genforge quantize`'s job (jobs/quantize.py) for every method on `--quant-run`
    (default runs/demo, the demo's trained model: a perplexity needs trained weights).
(c) Serving adapters: benchmarks/multi_adapter.py --quick as a subprocess; its table.

Writes benchmarks/results/finetune.json (finetune_quick.json with --quick) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, fmt, git_commit, md_table, median, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
CONTENDERS = ["genforge LoRA", "peft + transformers LoRA", "genforge full", "transformers full"]


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, as rss_now_mb


def rss_now_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def batches(folder: Path, a: argparse.Namespace):
    """genforge's SFT batches of builtin:pydoc-instructions for the model in `folder` (the sft
    family's split and order with seed 0: the same batches `genforge train` draws)."""
    from genforge.data.chat import PYDOC_INSTRUCTIONS, ChatBatches, encode_conversations, read_conversations
    from genforge.models.lm import load_lm, resolve_chat_template
    from genforge.train.sft import stop_ids

    model, tok = load_lm(folder)
    examples, _ = encode_conversations(read_conversations(PYDOC_INSTRUCTIONS), tok, resolve_chat_template(tok),
                                       a.max_length, stop_ids(model, tok), tok.eos_token_id)
    return ChatBatches(examples, a.batch_size, a.max_length, tok.pad_token_id, seed=0, val_fraction=0.1)


def worker_genforge(folder: Path, lora: bool, a: argparse.Namespace) -> dict:
    from genforge.common.config import recipe_from_tree
    from genforge.common.runs import RunDir
    from genforge.jobs.train import run_loaded_recipe
    from genforge.train.sft import SFTObjective

    # Memory is read when the loop asks for the optimizers (model and data loaded: "before") and
    # when training ends, before the loop exports the model (merging a LoRA copies weights): the
    # plain loop exports nothing, so both peaks cover the same work.
    export, optimizers, rss = SFTObjective.export, SFTObjective.optimizers, {}

    def measured_optimizers(self, cfg):
        rss["before_mb"] = rss_now_mb()
        return optimizers(self, cfg)

    def measured_export(self, model_dir: Path) -> None:
        rss["peak_mb"] = peak_rss_mb()
        export(self, model_dir)

    SFTObjective.optimizers, SFTObjective.export = measured_optimizers, measured_export
    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory() as tmp:
        tree = {"name": "bench", "family": "sft", "base": str(folder), "dataset": "builtin:pydoc-instructions",
                "out_dir": tmp, "data": {"max_length": a.max_length, "val_fraction": 0.1},
                "train": {"max_steps": total, "batch_size": a.batch_size, "lr": a.lr, "warmup_steps": 1,
                          "weight_decay": 0.0, "log_every": 1, "eval_every": total, "eval_batches": 1,
                          "checkpoint_every": total, "keep_last": 1, "seed": 0, "threads": a.threads}}
        if lora:
            tree["lora"] = dict(LORA)
        outcome = run_loaded_recipe(recipe_from_tree(tree))
        elapsed = {r["step"]: r["elapsed"] for r in RunDir(outcome.run.path).read_metrics() if "elapsed" in r}
        desc = outcome.run.report_path.read_text()
    share = next(line for line in desc.splitlines() if line.startswith("| trainable parameters |"))
    return {"steps_per_s": a.steps / (elapsed[total] - elapsed[a.warmup]), "trainable": share.split("|")[2].strip(),
            "peak_rss_mb": rss["peak_mb"], "rss_before_mb": rss["before_mb"]}


def worker_plain(folder: Path, lora: bool, a: argparse.Namespace) -> dict:
    """The loop a user writes with transformers (and peft for LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    data = batches(folder, a)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    before = rss_now_mb()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    model.train()
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            t0 = time.perf_counter()
        b = data.train_batch(i)
        # genforge's labels are already shifted (label t = token t+1); transformers shifts them itself
        labels = torch.full_like(b["labels"], -100)
        labels[:, 1:] = b["labels"][:, :-1]
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"steps_per_s": a.steps / seconds, "trainable": f"{trainable:,} ({100 * trainable / total:.2f}%)",
            "peak_rss_mb": rss, "rss_before_mb": before}


LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_worker(name: str, folder: Path, a: argparse.Namespace, env: dict | None = None) -> dict:
    args = [sys.executable, __file__, "--worker", name, "--model", str(folder)]
    for k in ("steps", "warmup", "threads", "batch_size", "max_length", "lr"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def training(folder: Path, a: argparse.Namespace) -> tuple[dict, str]:
    recs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for rnd in range(a.rounds):
        for c in CONTENDERS[rnd % 4:] + CONTENDERS[:rnd % 4]:
            r = run_worker(c, folder, a)
            recs[c].append(r)
            print(f"round {rnd + 1}/{a.rounds} {c}: {r['steps_per_s']:.2f} steps/s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MiB ({r['rss_before_mb']:.0f} before training)", flush=True)
    live = {}
    for c in CONTENDERS:
        live[c] = run_worker(c, folder, a, LIVE_MALLOC)
        print(f"live-memory run {c}: peak RSS {live[c]['peak_rss_mb']:.0f} MiB "
              f"({live[c]['rss_before_mb']:.0f} before training)", flush=True)
    summary = {c: {"steps_per_s": median([r["steps_per_s"] for r in rs]),
                   "live_peak_rss_mb": live[c]["peak_rss_mb"],
                   "live_training_rss_mb": live[c]["peak_rss_mb"] - live[c]["rss_before_mb"], "live_run": live[c],
                   "peak_rss_mb": median([r["peak_rss_mb"] for r in rs]),
                   "training_rss_mb": median([r["peak_rss_mb"] - r["rss_before_mb"] for r in rs]),
                   "trainable": rs[0]["trainable"],
                   "rounds": rs} for c, rs in recs.items()}
    ref = {"LoRA": summary["peft + transformers LoRA"]["steps_per_s"], "full": summary["transformers full"]["steps_per_s"]}
    rows = [[c, fmt(s["steps_per_s"], ".2f"), f"{s['steps_per_s'] / ref['LoRA' if 'LoRA' in c else 'full']:.2f}",
             fmt(s["peak_rss_mb"]), fmt(s["training_rss_mb"]), fmt(s["live_peak_rss_mb"]),
             fmt(s["live_training_rss_mb"]), s["trainable"]] for c, s in summary.items()]
    table = md_table(["training (lm-tiny, random weights)", "steps/s", "x plain loop", "peak RSS MiB",
                      "of which training MiB", "live peak MiB", "of which training MiB",
                      "trainable parameters"], rows)
    return summary, table


def quantization(run: Path, a: argparse.Namespace) -> tuple[list[dict], str]:
    from genforge.common.errors import GenforgeError
    from genforge.jobs.quantize import quantize_run
    from genforge.models.quantize import METHODS

    recs, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            try:
                r = quantize_run(run, method, Path(tmp) / method, eval_batches=a.eval_batches,
                                 max_new_tokens=a.new_tokens)
            except GenforgeError as e:
                recs.append({"method": method, "error": e.message})
                rows.append([method, "not on a CPU", None, None, None, None])
                continue
            recs.append(r)
            if not rows:
                rows.append(["fp32", fmt(r["tokens_per_s_fp"]), fmt(r["tokens_per_s_fp_fast_path"]),
                             fmt(r["weights_bytes_fp"] / 2**20, ".1f"), None, fmt(r["perplexity_fp"], ".2f")])
            rows.append([method, fmt(r["tokens_per_s_quantized"]), None, fmt(r["weights_bytes_quantized"] / 2**20, ".1f"),
                         fmt(r["folder_bytes"] / 2**20, ".1f"), fmt(r["perplexity_quantized"], ".2f")])
    table = md_table(["model", "tokens/s", "tokens/s, fp fast path", "weights MiB", "folder MiB", "perplexity"], rows)
    return recs, table


def serving() -> tuple[dict, str]:
    path = RESULTS / "multi_adapter_quick.json"
    existed = path.exists()
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_adapter.py"), "--quick"], check=True, cwd=ROOT)
    rec = json.loads(path.read_text())
    if not existed:
        path.unlink()  # its figures go into finetune.json
    return rec, rec["table"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quant-run", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="an HF folder; default: lm-tiny, random weights")
    p.add_argument("--no-serving", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        run = worker_genforge if a.worker.startswith("genforge") else worker_plain
        print(json.dumps(run(Path(a.model), "LoRA" in a.worker, a)))
        return
    if a.quick:
        a.steps, a.warmup, a.rounds, a.eval_batches, a.no_serving = 3, 1, 1, 2, True
    from serve_throughput import ensure_model

    folder = ensure_model(a.model, 0)
    out = {"settings": vars(a), "model": str(folder), "cpu": cpu_info(),
           "versions": versions("torch", "transformers", "peft", "torchao"), "commit": git_commit(ROOT)}
    out["training"], table_a = training(folder, a)
    print(table_a, flush=True)
    quant_run = Path(a.quant_run) if (Path(a.quant_run) / "model" / "config.json").is_file() else folder
    out["quant_model"] = str(quant_run)
    out["quantization"], table_b = quantization(quant_run, a)
    print(table_b, flush=True)
    tables = [table_a, table_b]
    if not a.no_serving:
        out["serving"], table_c = serving()
        print(table_c, flush=True)
        tables.append(table_c)
    out["tables"] = tables
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("finetune_quick.json" if a.quick else "finetune.json")
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
