"""`genforge train RECIPE`: resolve the recipe, build the family's objective, run the loop, report."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from genforge.common import tracking
from genforge.common.config import Recipe, load_recipe, to_dict
from genforge.common.errors import ConfigError, DataError, RunError
from genforge.common.progress import console
from genforge.common.runs import RunDir, environment_info, update_report
from genforge.train import distributed
from genforge.train.checkpoint import check_same_model, read_meta, resume_point
from genforge.train.loop import TrainResult, pick_device, pick_dtype, train
from genforge.train.objective import DataSource, Objective


@dataclass
class TrainOutcome:
    run: RunDir
    recipe: Recipe
    result: TrainResult
    main: bool = True  # False in the processes other than rank 0 of a torchrun launch, which print nothing

    def summary(self) -> str:
        r = self.result
        val = r.final_val.get("val_loss")
        lines = [f"run: {self.run.path}", f"steps: {r.steps}", f"wall time: {r.wall_time:.1f}s"]
        if val is not None:
            lines.append(f"val loss: {val:.4f} (best {r.best_val_loss:.4f})")
        if r.tokens:
            lines.append(f"tokens/s: {r.tokens / max(r.wall_time, 1e-9):,.0f}")
        lines += [f"model: {self.run.model_dir}", f"report: {self.run.report_path}"]
        if (self.run.path / tracking.TB_DIR).is_dir():
            lines.append(f"tensorboard: tensorboard --logdir {self.run.path / tracking.TB_DIR}")
        return "\n".join(lines)


def dataset_identity(path: str | Path) -> dict:
    """Path and content hash of a dataset folder, recorded in the run so eval finds the data."""
    stats = Path(path) / "stats.json"
    if not stats.is_file():
        raise DataError(f"dataset folder not found or incomplete: {path} (no stats.json); "
                        f"write one with `genforge data prepare INPUT --out {path}`")
    meta = json.loads(stats.read_text(encoding="utf-8"))
    return {"path": str(Path(path).resolve()), "content_hash": meta.get("content_hash")}


def _dataset_identity(recipe: Recipe) -> dict:
    """sft reads conversations and dpo preference pairs (a .jsonl file or a built-in set), distill
    either conversations or a dataset folder, the other families a prepared dataset folder."""
    from genforge.data import chat, preference
    from genforge.train import distill

    if recipe.family == "dpo":
        return preference.source_identity(recipe.dataset)
    if recipe.family == "sft" or (recipe.family == "distill" and distill.uses_chat(recipe.dataset)):
        return chat.source_identity(recipe.dataset)
    return dataset_identity(recipe.dataset)


def build_family(recipe: Recipe, device: torch.device) -> tuple[Objective, DataSource]:
    """The family's module under genforge/train/ builds its objective and data. Imported here, not at
    the top: importing every family (diffusers among them) cost a fine-tuning run 46 MiB of RSS."""
    module = recipe.family.replace("-", "_")  # latent-diffusion -> genforge.train.latent_diffusion
    return importlib.import_module(f"genforge.train.{module}").build(recipe, device)


def run_recipe(path: str | Path, overrides: list[str] | None = None, resume: bool = False) -> TrainOutcome:
    """Train one recipe into runs/<name>/ (or continue it with `resume`)."""
    recipe = load_recipe(path, overrides)
    return run_loaded_recipe(recipe, resume=resume)


def check_fresh(recipe: Recipe, resume: bool) -> RunDir:
    """The run's directory; refuses to start a run over an existing one's checkpoints."""
    run = RunDir(recipe.run_dir)
    if not resume and run.checkpoints():
        raise RunError(f"run {run.path} already exists; continue it with --resume, "
                       f"or train under another name (--set name=...)")
    return run


def run_loaded_recipe(recipe: Recipe, resume: bool = False) -> TrainOutcome:
    ranks = distributed.setup(recipe)  # under torchrun: join its process group (a no-op on one process)
    try:
        return _run(recipe, resume, ranks)
    finally:
        if ranks.world > 1:
            distributed.teardown()


def _run(recipe: Recipe, resume: bool, ranks: distributed.Ranks) -> TrainOutcome:
    cfg = recipe.train
    run = check_fresh(recipe, resume)
    dataset = _dataset_identity(recipe)
    saved = None
    if resume:
        # Refused before anything is built or written: no checkpoint, or a changed training recipe.
        saved = read_meta(resume_point(run, cfg))
    if resume and run.recipe_path.is_file():
        recorded = run.read_recipe().get("_provenance", {}).get("dataset", {})
        if recorded.get("content_hash") not in (None, dataset["content_hash"]):
            raise RunError(f"--resume: the dataset {recipe.dataset} changed since {run.path} was started "
                           f"(content hash differs); use a new run name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = distributed.local_device(pick_device(cfg.device))
    torch.manual_seed(cfg.seed)  # the same on every rank: FSDP shards, and DDP checks, identical initial weights
    objective, data = build_family(recipe, device)
    distributed.seed_rank(cfg.seed, ranks)  # ... then each rank its own random stream
    if saved is not None:  # ... or a changed model: refused before this segment's recipe is written
        check_same_model(saved["signature"], objective.signature(), run)
        _check_same_sections(run, recipe)
    processes = {"processes": ranks.world, "parallel": ranks.parallel} if ranks.world > 1 else {}
    if ranks.main:
        run.create()
        run.write_recipe(to_dict(recipe), {"dataset": dataset, "device": str(device), **processes},
                         resumed_from=saved["step"] if saved is not None else None)
    on = f"{ranks.world} processes ({ranks.parallel}, {distributed.backend_for(cfg)})" if ranks.world > 1 else device
    console.print(f"training [bold]{recipe.name}[/] ({recipe.family}) on {on}, "
                  f"precision {str(pick_dtype(cfg.precision, device)).replace('torch.', '')}")
    result = train(objective, data, cfg, run, device=device, resume=resume,
                   rebuild=lambda: build_family(recipe, torch.device("cpu"))[0])
    if ranks.main:
        update_report(run, "header", _header(recipe, dataset))
        update_report(run, "training", _training_section(recipe, objective, result, device, run, ranks))
        tracking.log_artifacts(run)  # report and plots to MLflow, when the run logs there
    return TrainOutcome(run=run, recipe=recipe, result=result, main=ranks.main)


def _flat(tree: object, prefix: str) -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def _check_same_sections(run: RunDir, recipe: Recipe) -> None:
    """The model, data, lora, dpo and distill sections, the base and the teacher as the run started
    (the signature covers only the architecture; a changed dropout, gradient penalty or
    augmentation would also change training)."""
    first = run.read_recipe() if run.recipe_path.is_file() else {}
    now = to_dict(recipe)
    for section in ("model", "data", "lora", "dpo", "distill", "base", "teacher"):
        old, new = _flat(first.get(section) or {}, section), _flat(now.get(section) or {}, section)
        changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if changed:
            k = changed[0]
            raise ConfigError(f"{k} changed from {old.get(k)!r} to {new.get(k)!r} since {run.path} was started; "
                              "a resume continues the same training: set it back or train under a new name",
                              param=k)


def _header(recipe: Recipe, dataset: dict) -> str:
    env = environment_info()
    versions = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    recipe_yaml = yaml.safe_dump(to_dict(recipe), sort_keys=False).rstrip()
    return (f"# Run `{recipe.name}`\n\nFamily **{recipe.family}**, dataset `{dataset['path']}` "
            f"(content hash `{dataset['content_hash']}`).\n\nPython {env['python']}; {versions}; "
            f"git commit `{env['git_commit'] or 'unknown'}`.\n\n<details><summary>recipe</summary>\n\n"
            f"```yaml\n{recipe_yaml}\n```\n</details>\n")


def _training_section(recipe: Recipe, objective: Objective, result: TrainResult, device: torch.device,
                      run: RunDir, ranks: distributed.Ranks) -> str:
    desc = objective.describe()
    rows = [("steps", f"{result.steps}" + (" (stopped by time budget)" if result.stopped_early else "")),
            ("wall time", f"{result.wall_time:.1f} s"), ("device", str(device))]
    if ranks.world > 1:
        rows.append(("processes", f"{ranks.world} ({ranks.parallel}; global batch {recipe.train.batch_size}, "
                                  f"{recipe.train.batch_size // ranks.world} per process)"))
    if result.tokens:
        rows.append(("tokens seen", f"{result.tokens:,}"))
        rows.append(("throughput", f"{result.tokens / max(result.wall_time, 1e-9):,.0f} tokens/s"))
    for k, v in desc.items():
        rows.append((k, f"{v:,}" if isinstance(v, int) else str(v)))
    for k, v in result.final_val.items():
        rows.append((f"final {k}", f"{v:.4f}"))
    if result.best_val_loss < float("inf"):
        rows.append(("best val_loss", f"{result.best_val_loss:.4f}"))
    t = recipe.train
    rows.append(("schedule", f"lr {t.lr:g}, warmup {t.warmup_steps}, cosine to {t.min_lr if t.min_lr is not None else t.lr / 10:g}, "
                             f"batch {t.batch_size} x accum {t.grad_accum}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    plot = "\n\n![loss](plots/loss.png)" if (run.plots_dir / "loss.png").is_file() else ""
    return f"## Training\n\n| | |\n|---|---|\n{table}{plot}\n"
