"""Training on several processes: PyTorch's own DDP and FSDP2, started by torchrun.

`torchrun --nproc-per-node N -m genforge train RECIPE` (or `genforge train RECIPE --nproc N`, which runs
exactly that) starts N copies of the one loop. This module holds the few places where they differ from
one process:

* `setup` joins the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA);
* `prepare` puts DDP or FSDP2 on the modules the loss calls, in place (torch's composable `replicate`,
  which is DistributedDataParallel under a forward hook, and `fully_shard`), so the families' objectives
  keep calling their own modules and never see a wrapper;
* `RankShard`: the recipe's `batch_size` stays the GLOBAL batch. Rank r of N trains on rows
  [r*B/N, (r+1)*B/N) of global batch i, DDP averages the gradients, so N processes take the steps one
  process takes with the same recipe (equal losses, up to the order of float sums), and a checkpoint's
  data position, the global step, means the same on any number of processes;
* `sum_over_ranks` / `any_rank`: what rank 0 logs is every rank's, and all ranks stop together;
* `checkpoint_tensors` / `load_checkpoint_tensors`: checkpoints hold full, unsharded tensors (FSDP's
  shards gathered to rank 0 through torch.distributed.checkpoint.state_dict) in the one-process format,
  so a run checkpointed on N processes resumes on M, or on one.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from genforge.common.config import Recipe, TrainConfig
from genforge.common.errors import ConfigError
from genforge.common.progress import console
from genforge.train import checkpoint
from genforge.train.objective import Objective
from genforge.train.optim import EMA, Stepper


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank 0 of 1 unless torchrun started several."""

    rank: int = 0
    world: int = 1
    parallel: str = "none"  # how the modules are spread: none (one process), ddp or fsdp
    device: str = "cpu"  # where collectives' tensors live (NCCL's must be on the GPU)

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """The number of processes torchrun started (1 for a plain `genforge train`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(cfg: TrainConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda else "gloo"


def check(recipe: Recipe, world: int) -> None:
    """Refuse a launch that cannot work, before any process starts (`--nproc` calls it in the parent)."""
    cfg = recipe.train
    if world == 1 and cfg.parallel == "fsdp":
        raise ConfigError("train.parallel: fsdp shards the model over several processes, but this run has one; "
                          "start it with `genforge train RECIPE --nproc N` (N >= 2) or torchrun, or set "
                          "train.parallel: ddp", param="train.parallel")
    if backend_for(cfg) == "nccl" and not torch.cuda.is_available():
        raise ConfigError("train.backend: nccl needs CUDA GPUs and none is available; use train.backend: gloo "
                          "(or auto)", param="train.backend")
    if world == 1:
        return
    if cfg.parallel == "none":
        raise ConfigError(f"train.parallel is none, but {world} processes were started; set train.parallel: ddp "
                          "or fsdp, or train on one process", param="train.parallel")
    if recipe.family == "gan":
        raise ConfigError("the gan family's alternating critic and generator steps (and WGAN-GP's double "
                          "backward) are not supported on several processes yet; train it on one",
                          param="train.parallel")
    if cfg.parallel == "fsdp" and recipe.lora is not None:
        raise ConfigError("train.parallel: fsdp with a LoRA adapter is not supported (the adapter is small: "
                          "use train.parallel: ddp)", param="train.parallel")
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size: {cfg.batch_size} is the global batch, split evenly over {world} "
                          f"processes; use a multiple of {world}", param="train.batch_size")
    if backend_for(cfg) == "nccl" and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise ConfigError(f"train.backend: nccl needs one GPU per process: {torch.cuda.device_count()} GPU(s) "
                          f"for {os.environ.get('LOCAL_WORLD_SIZE', world)} processes on this machine")


def setup(recipe: Recipe) -> Ranks:
    """Join torchrun's process group (a no-op on one process); only rank 0 prints from here on."""
    world = launched_world()
    check(recipe, world)
    if world == 1:
        return Ranks()
    backend = backend_for(recipe.train)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    ranks = current(recipe.train)
    console.quiet = not ranks.main  # the progress bar and messages are printed once, by rank 0
    return ranks


def current(cfg: TrainConfig) -> Ranks:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Ranks()
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return Ranks(dist.get_rank(), dist.get_world_size(), cfg.parallel, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    console.quiet = False


def local_device(device: torch.device) -> torch.device:
    """Each process on a machine gets its own GPU."""
    if device.type == "cuda" and launched_world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def seed_rank(seed: int, ranks: Ranks, step: int = 0) -> None:
    """Rank r > 0 draws its own random numbers (diffusion noise, dropout), as nanoGPT offsets its seed by
    rank: with one stream, every rank would noise its rows alike. Rank 0 keeps the one-process stream."""
    if ranks.rank == 0:
        return
    s = seed + 1_000_003 * ranks.rank + step
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


# ---------------------------------------------------------------------------------------- wrapping

def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the items of its outermost ModuleLists (a transformer's decoder
    layers, a UNet's down and up blocks). FSDP2 gathers each block's parameters as one unit."""
    found: list[nn.Module] = []
    for child in module.children():
        found.extend(child if isinstance(child, nn.ModuleList) else blocks(child))
    return found


def _checkpoint_activations(name: str, module: nn.Module) -> None:
    """The libraries' own activation checkpointing: transformers' and diffusers' models recompute each
    block's activations in backward instead of keeping them."""
    if hasattr(module, "activation_checkpointing_enable"):  # transformers (and peft, which forwards it)
        module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(module, "_supports_gradient_checkpointing", False):  # diffusers' ModelMixin
        module.enable_gradient_checkpointing()
    else:
        raise ConfigError(f"train.activation_checkpointing: the {name} module ({type(module).__name__}) does "
                          "not support it; set it to false", param="train.activation_checkpointing")


def prepare(objective: Objective, cfg: TrainConfig, ranks: Ranks, device: torch.device) -> None:
    """Activation checkpointing when asked, then DDP or FSDP2 on every module the loss calls; before the
    optimizers are made (FSDP2 replaces the parameters by their shards)."""
    if ranks.world == 1 and not cfg.activation_checkpointing:
        return
    modules = objective.parallel_modules()
    if cfg.activation_checkpointing:
        for name, module in modules.items():
            _checkpoint_activations(name, module)
    if ranks.world == 1:
        return
    # Composable APIs: the module object stays what the objective calls. Private module path, public
    # functions: torchtitan applies DDP the same way.
    from torch.distributed._composable.replicate import replicate
    from torch.distributed.fsdp import fully_shard

    for module in modules.values():
        if ranks.parallel == "fsdp":
            for block in blocks(module):
                fully_shard(block)
            fully_shard(module)
        elif device.type == "cuda":
            replicate(module, device_ids=[device.index])
        else:
            replicate(module)


# ------------------------------------------------------------------------------------------- data

def _rows(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, (torch.Tensor, list)):
        return batch[start:stop]
    if isinstance(batch, dict):
        return {k: _rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return type(batch)(_rows(v, start, stop) for v in batch)
    return batch


def _length(batch: Any) -> int:
    if isinstance(batch, (torch.Tensor, list)):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(_length(v) for v in items if isinstance(v, (torch.Tensor, list, dict, tuple)))


class RankShard:
    """This rank's rows of every global batch: a DataSource over another. Every rank builds the global
    batch (a pure function of the step, cheap next to a step) and keeps its slice, so no two ranks share
    a row and the union is exactly what one process would train on."""

    def __init__(self, data: Any, ranks: Ranks):
        self.data, self.ranks = data, ranks
        self.tokens_per_batch = data.tokens_per_batch  # the global batch's: schedules and tokens/s count all ranks

    def train_batch(self, index: int) -> Any:
        batch = self.data.train_batch(index)
        r, w = self.ranks.rank, self.ranks.world
        if hasattr(self.data, "shard"):  # rows that belong together (DPO's chosen and rejected halves)
            return self.data.shard(batch, r, w)
        n = _length(batch)
        return _rows(batch, r * n // w, (r + 1) * n // w)

    def val_batches(self, n: int) -> Any:
        return self.data.val_batches(n)


def my_share(items: Sequence[Any], ranks: Ranks) -> list[tuple[Any, float]]:
    """(item, weight) of this rank's part of `items` (every world-th one). All ranks run the same number
    of forwards, since FSDP gathers parameters collectively: a rank with one item fewer repeats one at
    weight 0."""
    mine = [(item, 1.0) for item in items[ranks.rank::ranks.world]]
    rounds = -(-len(items) // ranks.world)
    if len(mine) == rounds:  # also a run without validation data (no items at all)
        return mine
    return mine + [(items[0], 0.0)] * (rounds - len(mine))


def sum_over_ranks(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    if ranks.world == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def mean_over_ranks(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    return {k: v / ranks.world for k, v in sum_over_ranks(values, ranks).items()}


def any_rank(flag: bool, ranks: Ranks) -> bool:
    """True on every rank when it is true on one (a time budget: ranks' clocks differ, they stop together)."""
    return sum_over_ranks({"flag": float(flag)}, ranks)["flag"] > 0 if ranks.world > 1 else flag


# ------------------------------------------------------------------------------------- checkpoints

def _full_options(**kw: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _optimizer_by_index(state: dict) -> dict:
    """torch.distributed.checkpoint names optimizer state by parameter; a one-process `state_dict()`
    numbers it in param-group order. Checkpoints keep torch's numbering, so every run writes one format."""
    order = {fqn: i for i, fqn in enumerate(f for g in state["param_groups"] for f in g["params"])}
    return {"state": {order[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[f] for f in g["params"]]} for g in state["param_groups"]]}


def _optimizer_by_name(state: dict, holder: nn.Module, opt: torch.optim.Optimizer) -> dict:
    name = {p: n for n, p in holder.named_parameters()}
    order = [name[p] for g in opt.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def checkpoint_tensors(objective: Objective, stepper: Stepper, ema: EMA | None, ranks: Ranks) -> dict | None:
    """What a checkpoint's state.pt holds, as one process holds it; on rank 0 (None on the others).
    Every rank calls it: under FSDP, gathering the shards is collective."""
    if ranks.parallel != "fsdp":
        if not ranks.main:
            return None
        return {"modules": {n: m.state_dict() for n, m in objective.modules.items()},
                "optimizers": [o.state_dict() for o in stepper.optimizers],
                "ema": ema.shadow if ema else None,
                "scaler": stepper.scaler.state_dict() if stepper.scaler else None}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_options(cpu_offload=True)  # gathered to rank 0's memory; the others get {}
    holder = nn.ModuleDict(objective.modules)
    modules = {n: get_model_state_dict(m, options=opts) for n, m in objective.modules.items()}
    optimizers = [get_optimizer_state_dict(holder, o, options=opts) for o in stepper.optimizers]
    shadow = {n: {k: _full(v).cpu() for k, v in s.items()} for n, s in ema.shadow.items()} if ema else None
    if not ranks.main:
        return None
    return {"modules": modules, "optimizers": [_optimizer_by_index(s) for s in optimizers], "ema": shadow,
            "scaler": None}


def load_checkpoint_tensors(tensors: dict, objective: Objective, stepper: Stepper, ema: EMA | None,
                            ranks: Ranks) -> None:
    """Load a checkpoint's full tensors into the live (possibly sharded) objects, on every rank."""
    if ranks.parallel != "fsdp":
        for name, m in objective.modules.items():
            m.load_state_dict(tensors["modules"][name])
        for opt, s in zip(stepper.optimizers, tensors["optimizers"]):
            opt.load_state_dict(s)
        if ema is not None and tensors.get("ema"):
            ema.shadow = tensors["ema"]
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    opts = _full_options()  # every rank read the full checkpoint and keeps its own shard of it
    holder = nn.ModuleDict(objective.modules)
    for name, m in objective.modules.items():
        set_model_state_dict(m, tensors["modules"][name], options=opts)
    for opt, s in zip(stepper.optimizers, tensors["optimizers"]):
        set_optimizer_state_dict(holder, opt, _optimizer_by_name(s, holder, opt), options=opts)
    if ema is not None and tensors.get("ema"):
        for n, shadow in ema.shadow.items():
            for k, live in shadow.items():
                full = tensors["ema"][n][k].to(live.device)
                shadow[k] = (distribute_tensor(full, live.device_mesh, live.placements)
                             if isinstance(live, DTensor) else full)


def gather_rng(ranks: Ranks) -> list[tuple[dict, dict]] | None:
    """Every rank's RNG states, on rank 0 (a checkpoint resumes each rank's random stream)."""
    mine = checkpoint.rng_state()
    if ranks.world == 1:
        return [mine]
    out: list[Any] = [None] * ranks.world if ranks.main else []
    if ranks.device != "cpu":
        # NCCL's object collectives go through the GPU; the states themselves travel as CPU tensors
        mine = ({k: v.cpu() if isinstance(v, torch.Tensor) else [t.cpu() for t in v] for k, v in mine[0].items()},
                mine[1])
    dist.gather_object(mine, out if ranks.main else None, dst=0)
    return out if ranks.main else None


def restore_rng(tensors: dict, meta: dict, ranks: Ranks, seed: int) -> None:
    """This rank's RNG state from a checkpoint; a rank the checkpointing run did not have starts a fresh
    stream seeded by (seed, rank, step)."""
    if ranks.rank == 0:
        checkpoint.set_rng_state(tensors["rng"], meta["rng"])
        return
    saved_t, saved_p = tensors.get("rng_ranks") or [], meta.get("rng_ranks") or []
    if ranks.rank <= len(saved_t):
        checkpoint.set_rng_state(saved_t[ranks.rank - 1], saved_p[ranks.rank - 1])
    else:
        seed_rank(seed, ranks, meta["step"])


def unsharded(objective: Objective, ranks: Ranks, rebuild: Callable[[], Objective] | None) -> Objective:
    """The objective rank 0 exports model/ from: itself on one process; on several, a fresh one-process
    copy from `rebuild` holding the trained weights (FSDP's shards gathered), so export sees plain modules
    (a DDP module refuses the deepcopy that merging a LoRA adapter makes, an FSDP one holds shards) and
    writes the ecosystem's layout as always. Every rank calls it: gathering is collective."""
    if ranks.world == 1:
        return objective
    if ranks.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        opts = _full_options(cpu_offload=True)
        states = {n: get_model_state_dict(m, options=opts) for n, m in objective.modules.items()}
    else:
        states = {n: m.state_dict() for n, m in objective.modules.items()}
    if not ranks.main:
        return objective
    if rebuild is None:
        if ranks.parallel == "fsdp":
            raise ConfigError("train.parallel: fsdp needs a way to rebuild the model in one process to export "
                              "it; train through `genforge train`")
        return objective
    plain = rebuild()
    for name, m in plain.modules.items():
        m.load_state_dict(states[name])
    return plain
