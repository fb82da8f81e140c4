"""Char-level LM on tinyshakespeare: genforge's loop against a plain PyTorch loop, same model and data.

    python benchmarks/lm_shakespeare.py [--steps 2000] [--corpus ../shared/data/tinyshakespeare.txt]

Both train the same transformers Llama-style model (4 layers, 4 heads, width 128, context 64)
from the same initial weights, on the same genforge-prepared data (first 90% train, last 10% val),
with the same schedule, for 2000 steps x batch 12 x 64 tokens. The plain loop is what one writes
by hand: model forward, cross-entropy, AdamW, warmup + cosine, clipping; nothing else. Wall time
runs from the first step to the last, periodic evals included, the final full evaluation excluded.
Both final losses are over the whole validation split. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.common.config import recipe_from_tree
from genforge.data.tokens import TokenBatches, TokenDataset, prepare_text_dataset
from genforge.eval.lm import validation_loss
from genforge.jobs.train import run_loaded_recipe
from genforge.models.lm import LMSpec, build_lm_config, create_lm

ROOT = Path(__file__).resolve().parent
MODEL = {"preset": "lm-nano", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
         "intermediate_size": 512, "context_length": 64, "tie_embeddings": True}
TRAIN = {"batch_size": 12, "lr": 2e-3, "min_lr": 2e-5, "warmup_steps": 100, "weight_decay": 0.1,
         "betas": [0.9, 0.99], "grad_clip": 1.0, "eval_every": 500, "eval_batches": 20, "log_every": 50,
         "checkpoint_every": 1000, "keep_last": 1, "seed": 1337, "device": "cpu"}


def plain_loop(dataset: TokenDataset, steps: int, init_state: dict) -> tuple[torch.nn.Module, float]:
    """The speed peer: a hand-written loop over the same model, schedule and batch shape."""
    from genforge.common.config import TrainConfig
    from genforge.train.loop import lr_at

    cfg = TrainConfig(max_steps=steps, **{k: v for k, v in TRAIN.items() if k not in ("betas",)},
                      betas=tuple(TRAIN["betas"]))
    model = create_lm(build_lm_config(LMSpec(**MODEL), dataset.tokenizer))
    model.load_state_dict(init_state)
    # Same decay grouping as genforge (matrices only) so the two differ in loop mechanics, not recipe.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    train = torch.from_numpy(dataset.split("train").astype("int64"))
    val = TokenBatches(dataset.split("train"), dataset.split("val"), cfg.batch_size, 64, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, steps)
        ix = torch.randint(len(train) - 65, (cfg.batch_size,), generator=gen)
        x = torch.stack([train[i:i + 64] for i in ix])
        y = torch.stack([train[i + 1:i + 65] for i in ix])
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            model.eval()
            with torch.no_grad():
                vl = sum(F.cross_entropy(model(input_ids=b["input_ids"]).logits.flatten(0, 1),
                                         b["labels"].flatten()).item() for b in val.val_batches(cfg.eval_batches))
            model.train()
            print(f"  plain step {step + 1}: val_loss={vl / cfg.eval_batches:.4f}", file=sys.stderr)
    return model, time.perf_counter() - t0


def full_val_loss(model: torch.nn.Module, dataset: TokenDataset) -> float:
    data = TokenBatches(dataset.split("train"), dataset.split("val"), 64, 64, seed=0)
    return validation_loss(model.eval(), data.val_batches(None))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(ROOT.parent.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "results" / "lm_shakespeare.json"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="gf-bench-"))
    prepare_text_dataset(args.corpus, str(work / "ds"), tokenizer="char", val_fraction=0.1, doc_split="file")
    dataset = TokenDataset(work / "ds")

    tree = {"name": "shakespeare-char", "family": "lm", "dataset": str(work / "ds"), "out_dir": str(work / "runs"),
            "model": MODEL, "train": {"max_steps": args.steps, **TRAIN}}
    recipe = recipe_from_tree(tree)
    torch.manual_seed(TRAIN["seed"])
    init_state = create_lm(build_lm_config(LMSpec(**MODEL), dataset.tokenizer)).state_dict()

    outcome = run_loaded_recipe(recipe)
    from genforge.models.lm import load_lm

    gf_model, _ = load_lm(outcome.run.path)
    gf_time = outcome.result.wall_time
    gf_val = full_val_loss(gf_model, dataset)

    plain_model, plain_time = plain_loop(dataset, args.steps, init_state)
    plain_val = full_val_loss(plain_model, dataset)

    tokens = args.steps * TRAIN["batch_size"] * 64
    rows = [("genforge", gf_val, gf_time), ("plain PyTorch loop", plain_val, plain_time)]
    print(f"\nchar-level tinyshakespeare, {args.steps} steps x {TRAIN['batch_size']} x 64 tokens, "
          f"{sum(p.numel() for p in gf_model.parameters()):,} parameters, {torch.get_num_threads()} threads")
    print(f"{'loop':<22}{'val loss (nats/char)':>22}{'wall time (s)':>16}{'tokens/s':>12}")
    for name, val, secs in rows:
        print(f"{name:<22}{val:>22.4f}{secs:>16.1f}{tokens / secs:>12,.0f}")
    print(f"targets: val loss <= 1.65, wall time < 141 s (nanoGPT reference) and < the plain loop: "
          f"{'MET' if gf_val <= 1.65 and gf_time < 141 and gf_time < plain_time else 'NOT MET'}")
    result = {"benchmark": "lm_shakespeare", "steps": args.steps, "batch_size": TRAIN["batch_size"], "context": 64,
              "model": MODEL, "train": TRAIN, "tokens": tokens, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "genforge": {"val_loss": gf_val, "wall_s": gf_time, "tokens_per_s": tokens / gf_time},
              "plain_loop": {"val_loss": plain_val, "wall_s": plain_time, "tokens_per_s": tokens / plain_time},
              "targets": {"val_loss_max": 1.65, "wall_s_max": 141.0},
              "met": gf_val <= 1.65 and gf_time < 141 and gf_time < plain_time,
              "nats_to_bits": 1 / math.log(2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
