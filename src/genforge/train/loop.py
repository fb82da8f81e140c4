"""The one training loop. Every family (LM, VAE, GAN, diffusion, classifier) runs through here.

The loop owns: device and precision, warmup + cosine schedule, gradient accumulation and clipping,
EMA, periodic eval, atomic checkpoints (last N + best) with exact resume, the progress bar,
metrics.jsonl (mirrored to TensorBoard and MLflow by common/tracking.py) and loss plots; with
`genforge train --trace`, OpenTelemetry spans of the run, its data loading, steps, evals and
checkpoints (common/tracing.py; no-ops otherwise). Every step is traced: a span costs microseconds
against a step's milliseconds, and the exporter's batch queue bounds memory on long runs (it drops
spans rather than grow). A family owns its objective (see objective.py); checkpoint files are
checkpoint.py's, optimizer stepping and EMA optim.py's. On several processes (torchrun) the same
loop runs in each; the few lines that differ call train/distributed.py (wrap the modules, shard the
data, average what is logged, gather what is checkpointed, write files on rank 0 only).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from genforge.common.config import TrainConfig
from genforge.common.errors import ConfigError
from genforge.common.progress import console, plot_curves, progress_bar
from genforge.common.runs import RunDir, atomic_dir
from genforge.common.tracing import span
from genforge.common.tracking import TrackedMetrics
from genforge.train import checkpoint, distributed
from genforge.train.objective import DataSource, MultiStep, Objective, SingleLoss
from genforge.train.optim import EMA, Stepper, maybe


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps was asked for but is not available")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA by default; fp32 on CPU/MPS unless the recipe asks."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def total_steps(cfg: TrainConfig, data: DataSource) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if not data.tokens_per_batch:
        raise ConfigError("train.max_tokens needs a token-based family; set train.max_steps instead")
    return max(1, math.ceil(cfg.max_tokens / (data.tokens_per_batch * cfg.grad_accum)))


def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    """Linear warmup, then cosine from lr down to min_lr at the last step."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class TrainResult:
    steps: int
    final_val: dict = field(default_factory=dict)
    best_val_loss: float = math.inf
    wall_time: float = 0.0
    tokens: int = 0
    stopped_early: bool = False


def train(objective: Objective, data: DataSource, cfg: TrainConfig, run: RunDir, *,
          device: torch.device, resume: bool = False, rebuild: Callable[[], Objective] | None = None) -> TrainResult:
    """Train `objective` on `data` into `run`; with `resume`, continue from its latest checkpoint.
    `rebuild` makes a fresh one-process objective: with FSDP, model/ is exported from one."""
    with _denormals_flushed(device.type == "cpu"), span("train", {"genforge.run": run.path.name}):
        return _train(objective, data, cfg, run, device=device, resume=resume, rebuild=rebuild)


@contextlib.contextmanager
def _denormals_flushed(on: bool):
    """Adam's second moments and late-training gradients drift into denormal floats, which x86 CPUs
    process tens of times slower; flushing them to zero costs no accuracy. The flag is per thread
    and process-wide state, so it is switched off again when training ends (torch's default)."""
    if on:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def _train(objective: Objective, data: DataSource, cfg: TrainConfig, run: RunDir, *,
           device: torch.device, resume: bool, rebuild: Callable[[], Objective] | None) -> TrainResult:
    ranks = distributed.current(cfg)  # rank 0 of 1 unless torchrun started several processes
    distributed.prepare(objective, cfg, ranks, device)  # activation checkpointing; DDP or FSDP2 in place
    if ranks.world > 1:
        data = distributed.RankShard(data, ranks)  # this rank's rows of each global batch
    steps = total_steps(cfg, data)
    stepper = Stepper(objective.optimizers(cfg), cfg, device, pick_dtype(cfg.precision, device))
    ema = EMA(objective.modules, cfg.ema_decay) if cfg.ema_decay else None
    # metrics.jsonl, TensorBoard (runs/<name>/tb/) and MLflow when configured; written by rank 0 alone
    metrics = TrackedMetrics(run) if ranks.main else None
    if ranks.main:
        checkpoint.remove_stale_temps(run)
    start, best, elapsed_before, tokens = 0, math.inf, 0.0, 0
    if resume:
        start, best, elapsed_before, tokens = _restore(checkpoint.resume_point(run, cfg), objective, stepper,
                                                       ema, run, device, ranks, cfg.seed)
        if metrics:
            metrics.truncate_after(start)
        console.print(f"resuming {run.path} from step {start}")
    elif metrics:
        metrics.reset()  # a fresh run starts fresh logs

    def evaluate() -> dict:
        for m in objective.modules.values():
            m.eval()
        sums: dict[str, float] = {}
        n = 0.0
        with torch.no_grad(), stepper.autocast(), maybe(ema and ema.swapped_in(objective.modules)):
            # each rank evaluates its share of the batches; the sums are added up over ranks
            for batch, weight in distributed.my_share(list(data.val_batches(cfg.eval_batches)), ranks):
                for k, v in objective.eval_step(to_device(batch, device)).items():
                    sums[k] = sums.get(k, 0.0) + weight * float(v)
                n += weight
        for m in objective.modules.values():
            m.train()
        sums = distributed.sum_over_ranks({**sums, "_n": n}, ranks)
        n = sums.pop("_n")
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

    for m in objective.modules.values():
        m.train()
    t0 = time.perf_counter()
    done, stopped_early, last_val = start, False, {}
    tokens_per_step = (data.tokens_per_batch or 0) * cfg.grad_accum
    with progress_bar() as bar:
        task = bar.add_task(run.path.name, total=steps, completed=start, info="")
        tok_t0, tok_count = time.perf_counter(), 0
        for step in range(start, steps):
            lr = lr_at(step, cfg, steps)
            stepper.set_lr(lr)
            row: dict[str, float] = {}
            with span("step", {"genforge.step": step + 1}):
                if isinstance(objective, MultiStep):
                    with span("data"):
                        batch = to_device(data.train_batch(step), device)
                    row = objective.step(batch, stepper)
                else:
                    assert isinstance(objective, SingleLoss)
                    for micro in range(cfg.grad_accum):
                        with span("data"):
                            batch = to_device(data.train_batch(step * cfg.grad_accum + micro), device)
                        with stepper.autocast():
                            loss, stats = objective.loss(batch)
                        stepper.backward(loss / cfg.grad_accum)
                        for k, v in stats.items():
                            row[k] = row.get(k, 0.0) + float(v) / cfg.grad_accum
                    row["grad_norm"] = stepper.step(0)
                stepper.end_step()
            if ema is not None:
                ema.update(objective.modules)
            done = step + 1
            tokens += tokens_per_step
            tok_count += tokens_per_step

            elapsed = elapsed_before + time.perf_counter() - t0
            timed_out = cfg.time_budget is not None and distributed.any_rank(elapsed >= cfg.time_budget, ranks)
            last = done == steps or timed_out
            if _due(done, cfg.log_every, last):
                now = time.perf_counter()
                tps = tok_count / max(now - tok_t0, 1e-9)
                tok_t0, tok_count = now, 0
                row = {"step": done, "lr": lr, **distributed.mean_over_ranks(row, ranks), "elapsed": elapsed}
                if data.tokens_per_batch:
                    row["tokens_per_s"] = tps
                if metrics:
                    metrics.log(row)
                info = " ".join(f"{k}={row[k]:.4g}" for k in ("loss", "loss_g", "loss_d") if k in row)
                bar.update(task, info=info + (f" tok/s={tps:,.0f}" if data.tokens_per_batch else ""))
            is_best = False
            if _due(done, cfg.eval_every, last):
                with span("eval", {"genforge.step": done}):
                    last_val = evaluate()
                if metrics:
                    metrics.log({"step": done, **last_val})
                bar.console.print(f"step {done}: " + " ".join(f"{k}={v:.4f}" for k, v in last_val.items()))
                is_best = last_val.get("val_loss", math.inf) < best
                best = min(best, last_val.get("val_loss", math.inf))
            periodic = _due(done, cfg.checkpoint_every, last)
            if periodic or is_best:
                with span("checkpoint", {"genforge.step": done}):
                    # full tensors and every rank's RNG, gathered to rank 0, which writes once
                    tensors = distributed.checkpoint_tensors(objective, stepper, ema, ranks)
                    rngs = distributed.gather_rng(ranks)
                    meta = {"step": done, "signature": objective.signature(),
                            "train": checkpoint.training_recipe(cfg), "best_val_loss": best,
                            "elapsed": elapsed_before + time.perf_counter() - t0, "tokens": tokens,
                            "world_size": ranks.world}
                    if ranks.main:
                        for name in [f"step-{done}"] * periodic + ["best"] * is_best:
                            checkpoint.save(run, name, tensors, meta, rngs)
                        checkpoint.prune(run, cfg.keep_last)
            bar.update(task, completed=done)
            if timed_out and done < steps:
                stopped_early = True
                console.print(f"time budget of {cfg.time_budget:.0f}s reached at step {done}/{steps}")
                break
    wall = elapsed_before + time.perf_counter() - t0
    with maybe(ema and ema.swapped_in(objective.modules)):
        exported = distributed.unsharded(objective, ranks, rebuild)  # FSDP: a one-process copy, on rank 0
        if ranks.main:
            with atomic_dir(run.model_dir) as tmp:
                exported.export(tmp)
    if metrics:
        metrics.close()
        rows = run.read_metrics()
        loss_keys = sorted({k for r in rows for k in r if "loss" in k and not k.startswith("val_")})
        plot_curves(rows, loss_keys + ["val_loss"], run.plots_dir / "loss.png", title=f"{run.path.name}: loss")
    return TrainResult(steps=done, final_val=last_val, best_val_loss=best, wall_time=wall,
                       tokens=tokens, stopped_early=stopped_early)


def _due(done: int, every: int, last: bool) -> bool:
    """Log, eval and checkpoint every N steps, and always at the last step of a run or segment."""
    return done % every == 0 or last


def _restore(path, objective: Objective, stepper: Stepper, ema: EMA | None, run: RunDir,
             device: torch.device, ranks: distributed.Ranks, seed: int) -> tuple[int, float, float, int]:
    """Load checkpoint `path` into the live objects (every rank reads it); (step, best val loss, elapsed,
    tokens). The checkpoint may come from any number of processes: its tensors are full ones."""
    tensors, meta = checkpoint.load(path, device)
    checkpoint.check_same_model(meta["signature"], objective.signature(), run)
    distributed.load_checkpoint_tensors(tensors, objective, stepper, ema, ranks)
    if stepper.scaler is not None and tensors.get("scaler"):
        stepper.scaler.load_state_dict(tensors["scaler"])
    distributed.restore_rng(tensors, meta, ranks, seed)
    return meta["step"], meta["best_val_loss"], meta["elapsed"], meta["tokens"]
