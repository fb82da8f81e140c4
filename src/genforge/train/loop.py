"""The one training loop. Every family (LM, VAE, GAN, diffusion, classifier) runs through here.

The loop owns: device and precision, warmup + cosine schedule, gradient accumulation and clipping,
EMA, periodic eval, atomic checkpoints (last N + best) with exact resume, the progress bar,
metrics.jsonl, loss plots and the training section of report.md. A family owns its objective
(see objective.py).
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genforge.common.config import TrainConfig
from genforge.common.errors import ConfigError, RunError
from genforge.common.progress import MetricsLog, console, plot_curves, progress_bar
from genforge.common.runs import RunDir, atomic_dir
from genforge.train.objective import DataSource, MultiStep, Objective, SingleLoss


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


class EMA:
    """Exponential moving average of the trained modules' floating-point state."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {n: {k: v.detach().clone() for k, v in m.state_dict().items() if v.is_floating_point()}
                       for n, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module]) -> None:
        for n, m in modules.items():
            state = m.state_dict()
            shadow = list(self.shadow[n].values())
            live = [state[k] for k in self.shadow[n]]
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, modules: dict[str, torch.nn.Module]):
        """Temporarily load EMA weights into the modules (for eval and export)."""
        saved = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
        for n, m in modules.items():
            m.load_state_dict(self.shadow[n], strict=False)
        try:
            yield
        finally:
            for n, m in modules.items():
                m.load_state_dict(saved[n])


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(objective: Objective, data: DataSource, cfg: TrainConfig, run: RunDir, *,
          device: torch.device, resume: bool = False, max_steps_now: int | None = None) -> TrainResult:
    """Train `objective` on `data` into `run`. `max_steps_now` stops early (tests kill a run this way)."""
    steps = total_steps(cfg, data)
    if device.type == "cpu":
        # Adam's second moments and late-training gradients drift into denormal floats, which
        # x86 CPUs process tens of times slower; flushing them to zero costs no accuracy.
        torch.set_flush_denormal(True)
    dtype = pick_dtype(cfg.precision, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    optimizers = objective.optimizers(cfg)
    params = [p for m in objective.modules.values() for p in m.parameters() if p.requires_grad]
    ema = EMA(objective.modules, cfg.ema_decay) if cfg.ema_decay else None
    metrics = MetricsLog(run.metrics_path)
    start_step, best, elapsed_before, tokens = 0, math.inf, 0.0, 0

    ckpt = run.latest_checkpoint() if resume else None
    if resume and ckpt is None:
        raise RunError(f"--resume: {run.path} has no checkpoint to resume from")
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        if state["signature"] != objective.signature():
            raise RunError(f"--resume: {run.path} was trained with a different model config "
                           f"({_diff(state['signature'], objective.signature())}); use a new run name")
        for name, m in objective.modules.items():
            m.load_state_dict(state["modules"][name])
        for opt, s in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        if ema is not None and state.get("ema"):
            ema.shadow = state["ema"]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, best = state["step"], state["best_val_loss"]
        elapsed_before, tokens = state["elapsed"], state["tokens"]
        _set_rng_state(state["rng"])
        metrics.truncate_after(start_step)
        console.print(f"resuming {run.path} from step {start_step}")
    elif not resume and run.metrics_path.exists():
        run.metrics_path.unlink()  # a fresh run starts a fresh log

    def update(i: int, loss: torch.Tensor) -> None:
        """Backpropagate `loss` and step optimizer `i` (the MultiStep path)."""
        opt = optimizers[i]
        (scaler.scale(loss) if scaler else loss).backward()
        _clip_and_step(opt, [p for g in opt.param_groups for p in g["params"]], cfg, scaler)

    def evaluate() -> dict:
        for m in objective.modules.values():
            m.eval()
        sums: dict[str, float] = {}
        n = 0
        with torch.no_grad(), autocast, (ema.swapped_in(objective.modules) if ema else contextlib.nullcontext()):
            for batch in data.val_batches(cfg.eval_batches):
                for k, v in objective.eval_step(to_device(batch, device)).items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        for m in objective.modules.values():
            m.train()
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}

    for m in objective.modules.values():
        m.train()
    stop_at = min(steps, max_steps_now) if max_steps_now else steps
    t0 = time.perf_counter()
    step, stopped_early, last_val = start_step, False, {}
    with progress_bar() as bar:
        task = bar.add_task(run.path.name, total=steps, completed=start_step, info="")
        tok_t0, tok_count = time.perf_counter(), 0
        for step in range(start_step, stop_at):
            lr = lr_at(step, cfg, steps)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
            row: dict[str, float] = {}
            if isinstance(objective, MultiStep):
                with autocast:
                    row = objective.step(to_device(data.train_batch(step), device), update)
            else:
                assert isinstance(objective, SingleLoss)
                for micro in range(cfg.grad_accum):
                    batch = to_device(data.train_batch(step * cfg.grad_accum + micro), device)
                    with autocast:
                        loss, stats = objective.loss(batch)
                    loss = loss / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    for k, v in stats.items():
                        row[k] = row.get(k, 0.0) + float(v) / cfg.grad_accum
                row["grad_norm"] = _clip_and_step(optimizers[0], params, cfg, scaler)
            if ema is not None:
                ema.update(objective.modules)
            done = step + 1
            tokens += (data.tokens_per_batch or 0) * cfg.grad_accum
            tok_count += (data.tokens_per_batch or 0) * cfg.grad_accum

            timed_out = cfg.time_budget is not None and elapsed_before + time.perf_counter() - t0 >= cfg.time_budget
            if done % cfg.log_every == 0 or done == stop_at or timed_out:
                now = time.perf_counter()
                tps = tok_count / max(now - tok_t0, 1e-9)
                tok_t0, tok_count = now, 0
                row = {"step": done, "lr": lr, **row, "elapsed": elapsed_before + now - t0}
                if data.tokens_per_batch:
                    row["tokens_per_s"] = tps
                metrics.log(row)
                info = " ".join(f"{k}={row[k]:.4g}" for k in ("loss", "loss_g", "loss_d") if k in row)
                bar.update(task, info=info + (f" tok/s={tps:,.0f}" if data.tokens_per_batch else ""))
            if done % cfg.eval_every == 0 or done == steps or timed_out:
                last_val = evaluate()
                metrics.log({"step": done, **last_val})
                bar.console.print(f"step {done}: " + " ".join(f"{k}={v:.4f}" for k, v in last_val.items()))
            is_best = bool(last_val) and last_val.get("val_loss", math.inf) < best and (
                done % cfg.eval_every == 0 or done == steps or timed_out)
            if is_best:
                best = last_val["val_loss"]
            if done % cfg.checkpoint_every == 0 or done == stop_at or timed_out or is_best:
                state = {"step": done, "signature": objective.signature(),
                         "modules": {n: m.state_dict() for n, m in objective.modules.items()},
                         "optimizers": [o.state_dict() for o in optimizers],
                         "ema": ema.shadow if ema else None, "scaler": scaler.state_dict() if scaler else None,
                         "best_val_loss": best, "elapsed": elapsed_before + time.perf_counter() - t0,
                         "tokens": tokens, "rng": _rng_state()}
                if done % cfg.checkpoint_every == 0 or done == stop_at or timed_out:
                    _save_checkpoint(run, f"step-{done}", state)
                    _prune(run, cfg.keep_last)
                if is_best:
                    _save_checkpoint(run, "best", state)
            bar.update(task, completed=done)
            if timed_out and done < steps:
                stopped_early = True
                console.print(f"time budget of {cfg.time_budget:.0f}s reached at step {done}/{steps}")
                break
    wall = elapsed_before + time.perf_counter() - t0
    finished = step + 1 if stop_at > start_step else start_step
    if finished == steps or stopped_early:
        with atomic_dir(run.model_dir) as tmp, (ema.swapped_in(objective.modules) if ema else contextlib.nullcontext()):
            objective.export(tmp)
        loss_keys = sorted({k for r in run.read_metrics() for k in r if "loss" in k and not k.startswith("val_")})
        plot_curves(run.read_metrics(), loss_keys + ["val_loss"], run.plots_dir / "loss.png",
                    title=f"{run.path.name}: loss")
    return TrainResult(steps=finished, final_val=last_val, best_val_loss=best, wall_time=wall,
                       tokens=tokens, stopped_early=stopped_early)


def _clip_and_step(opt: torch.optim.Optimizer, params: list, cfg: TrainConfig, scaler) -> float:
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else math.inf)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def _save_checkpoint(run: RunDir, name: str, state: dict) -> None:
    with atomic_dir(run.checkpoints_dir / name) as tmp:
        torch.save(state, tmp / "state.pt")


def _prune(run: RunDir, keep_last: int) -> None:
    for old in run.checkpoints()[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(changed[:4]) or "unknown difference"


def checkpoint_path(run: RunDir) -> Path | None:
    return run.latest_checkpoint()
