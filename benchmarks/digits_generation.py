"""Image generation on scikit-learn digits at 16x16: VAE, DCGAN, WGAN-GP and class-conditional
diffusion, each trained on the CPU through `jobs.train.run_recipe`, scored by `genforge eval`.

    python benchmarks/digits_generation.py [--threads 2] [--quick]

Each family trains from its configs/*.yaml recipe (the VAE on all ten classes here), capped at
`--cap` seconds (10 minutes by default; the recipes aim at 2-4). Every model is scored the same way
(jobs/image_eval.py): FID/KID on the domain classifier's features against the real-vs-real floor
(held-out images), class accuracy, mode coverage, nearest-training-image distance, samples/s for
DDIM-50 and DDPM-1000, and the PCA+GaussianMixture baseline in the same table. Then the
augmentation study: a second diffusion model trained WITHOUT 90% of one class's training images
oversamples that class for a classifier (jobs/augment.py).

Targets (from the issue): diffusion with guidance >= 95% class accuracy, FID <= 2x the floor and
below PCA+GMM; the augmentation study raises minority recall by >= 10 points. Peer figure
(PEERS.md): a 1.1M-parameter UNet, 410 steps x batch 128 (~3 CPU-minutes), DDIM-50, guidance 3:
94% class accuracy by an independent classifier (76% without guidance).

Prints a table; writes benchmarks/results/digits_generation.json and one sample grid per model.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from genforge.common.config import load_recipe, to_dict
from genforge.common.runs import RunDir
from genforge.data.images import ImageBatches, ImageDataset, prepare_image_dataset
from genforge.jobs.augment import augmentation_study, minority_subset
from genforge.jobs.image_eval import evaluate_image_run
from genforge.jobs.imagegen import generate_grid
from genforge.jobs.train import dataset_identity, run_loaded_recipe
from genforge.train.diffusion import build as build_diffusion
from genforge.train.loop import pick_device, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = {  # name -> (recipe, overrides)
    "vae": ("vae.yaml", ["data.exclude_classes=[]"]),
    "dcgan": ("gan-dcgan.yaml", []),
    "wgan-gp": ("gan-wgan-gp.yaml", []),
    "diffusion": ("diffusion.yaml", []),
}
GUIDANCE = 1.5  # the eval default: ~99% class accuracy at the floor FID (g=2-3: purer classes, less diversity)


def recipe_for(family: str, args: argparse.Namespace, data: Path, runs: Path, name: str | None = None,
               extra: list[str] | None = None):
    path, overrides = FAMILIES[family]
    sets = [f"dataset={data}", f"out_dir={runs}", f"name={name or family}", f"train.time_budget={args.cap}",
            *overrides, *(extra or [])]
    if args.threads:
        sets.append(f"train.threads={args.threads}")
    if args.quick:  # a smoke test of the whole script in a few minutes
        steps = 60 if family == "wgan-gp" else 200 if family == "diffusion" else 150
        sets += [f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    return load_recipe(ROOT / "configs" / path, sets)


def train_family(family: str, args, data: Path, runs: Path) -> tuple[Path, dict]:
    recipe = recipe_for(family, args, data, runs)
    shutil.rmtree(recipe.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    outcome = run_loaded_recipe(recipe)
    r = outcome.result
    return outcome.run.path, {"train_seconds": r.wall_time, "steps": r.steps, "stopped_by_cap": r.stopped_early,
                              "wall_seconds": time.perf_counter() - t0,
                              "parameters": _parameters(outcome.run.path)}


def _parameters(run: Path) -> int:
    from genforge.models.diffusion import load_image_generator

    gen = load_image_generator(run)
    module = gen.unet if hasattr(gen, "unet") else gen.module
    return sum(p.numel() for p in module.parameters())


def train_minority_diffusion(args, data: Path, runs: Path) -> tuple[Path, dict]:
    """Diffusion trained on the reduced training set the augmentation study uses (same mask)."""
    recipe = recipe_for("diffusion", args, data, runs, name="diffusion-minority")
    run = RunDir(recipe.run_dir)
    shutil.rmtree(run.path, ignore_errors=True)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = pick_device(recipe.train.device)
    torch.manual_seed(recipe.train.seed)
    objective, full = build_diffusion(recipe, device)
    ds = ImageDataset(recipe.dataset)
    k = ds.class_index(args.minority_class)
    mask = minority_subset(full.labels, k, args.keep_fraction, args.seed)
    data_src = ImageBatches(full.images[mask], full.labels[mask], recipe.train.batch_size, recipe.train.seed,
                            full.augment, val=full.val)
    run.create()
    run.write_recipe(to_dict(recipe), {"dataset": dataset_identity(recipe.dataset), "device": str(device),
                                       "minority": {"class": ds.classes[k], "keep_fraction": args.keep_fraction,
                                                    "seed": args.seed, "train_images": int(mask.sum())}})
    result = train(objective, data_src, recipe.train, run, device=device)
    return run.path, {"train_seconds": result.wall_time, "steps": result.steps}


def table(rows: list[dict]) -> str:
    head = (f"{'model / set':<42} {'FID [95% CI]':>24} {'xfloor':>6} {'KID':>8} {'acc':>6} {'cover':>6} "
            f"{'NN':>6} {'copies':>6} {'img/s':>7} {'train s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fid = f"{r['fid']:.3f} [{r['fid_low']:.2f}, {r['fid_high']:.2f}]" if "fid" in r else "—"
        xf = f"{r['fid_over_floor']:.2f}" if "fid_over_floor" in r else "—"
        acc = f"{100 * r['class_accuracy']:.1f}" if "class_accuracy" in r else "—"
        sps = f"{r['samples_per_s']:.3g}" if "samples_per_s" in r else "—"
        ts = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "—"
        lines.append(f"{r['name'][:42]:<42} {fid:>24} {xf:>6} {r['kid']:>8.3f} {acc:>6} {100 * r['coverage']:>5.0f}% "
                     f"{r['nn_distance']:>6.3f} {100 * r['near_copies']:>5.1f}% {sps:>7} {ts:>7}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-digits"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--cap", type=float, default=600, help="seconds of training per family, at most")
    p.add_argument("--num-samples", type=int, default=None, help="samples per row (default: held-out size)")
    p.add_argument("--minority-class", default="8")
    p.add_argument("--keep-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--quick", action="store_true", help="few steps: checks the script, not the claims")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    data, runs = work / "data" / "digits16", work / "runs"
    stats = prepare_image_dataset("builtin:digits", data, val_fraction=0.2, size=16, seed=0)
    n = args.num_samples or stats["val_images"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    report: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "platform": platform.platform()},
                    "dataset": {k: stats[k] for k in ("train_images", "val_images", "size", "content_hash")},
                    "num_samples": n, "guidance": GUIDANCE, "families": {}, "rows": []}
    floor = baseline = None
    for family in args.families.split(","):
        run, info = train_family(family, args, data, runs)
        print(f"[{family}] trained {info['steps']} steps in {info['train_seconds']:.0f}s", flush=True)
        t0 = time.perf_counter()
        summary = evaluate_image_run(run, num_samples=n, guidance=GUIDANCE, steps=50,
                                     ddpm_samples=0 if args.quick else 10, seed=args.seed)
        metrics = json.loads((run / "eval" / "image_metrics.json").read_text())
        info["eval_seconds"] = time.perf_counter() - t0
        grid = generate_grid(run, num_samples=100, class_label=None, guidance=GUIDANCE if family == "diffusion"
                             else None, steps=50 if family == "diffusion" else None, sampler="ddim",
                             seed=args.seed, out=work / "grids" / f"digits_{family}.png")
        grid = Path(shutil.copy(grid, RESULTS / grid.name))  # the grid only; the singles stay in work/
        info.update(summary=summary, grid=str(grid.relative_to(ROOT)))
        report["families"][family] = info
        rows = metrics["rows"]
        floor = floor or rows[0]
        if baseline is None or ("class_accuracy" in rows[-1] and "class_accuracy" not in baseline):
            baseline = rows[-1]  # the class-conditional PCA+GMM once a conditional model was scored
        for i, r in enumerate(rows[1:-1]):
            r = dict(r, family=family)
            if "fid" in r and floor.get("fid"):
                r["fid_over_floor"] = r["fid"] / floor["fid"]
            if i == 0:  # the family's main row carries its training time
                r["train_seconds"] = info["train_seconds"]
            report["rows"].append(r)
        print(f"[{family}] evaluated in {info['eval_seconds']:.0f}s: " +
              ", ".join(f"{k}={v:.3g}" for k, v in summary.items() if isinstance(v, float)), flush=True)
    base_row = dict(baseline, fid_over_floor=baseline["fid"] / floor["fid"])
    report["rows"] = [floor, *report["rows"], base_row]

    if "diffusion" in args.families.split(","):
        run, info = train_minority_diffusion(args, data, runs)
        study = augmentation_study(run, args.minority_class, keep_fraction=args.keep_fraction, seed=args.seed,
                                   guidance=GUIDANCE)
        report["augmentation"] = {**study, **info}
        d = next(r for r in report["rows"] if r.get("family") == "diffusion")
        report["targets"] = {
            "diffusion_class_accuracy>=0.95": d.get("class_accuracy", 0) >= 0.95,
            "diffusion_fid<=2x_floor": d.get("fid", float("inf")) <= 2 * floor["fid"],
            "diffusion_fid<pca_gmm": d.get("fid", float("inf")) < baseline["fid"],
            "augmentation_recall_gain>=10pts": study["recall_gain_points"] >= 10,
        }
    report["total_seconds"] = time.perf_counter() - t_start

    print()
    print(table(report["rows"]))
    if "augmentation" in report:
        a = report["augmentation"]
        print(f"\naugmentation study, class {a['minority_class']}: {a['kept_real']} real + {a['generated']} "
              f"generated images; recall {100 * a['recall_without']:.1f}% -> {100 * a['recall_with']:.1f}% "
              f"({a['recall_gain_points']:+.1f} points); accuracy {100 * a['accuracy_without']:.1f}% -> "
              f"{100 * a['accuracy_with']:.1f}%")
        for k, ok in report["targets"].items():
            print(f"  {'PASS' if ok else 'FAIL'}  {k}")
    print(f"total {report['total_seconds'] / 60:.1f} min")
    out = RESULTS / ("digits_generation_quick.json" if args.quick else "digits_generation.json")
    out.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
