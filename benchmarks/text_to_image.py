"""Text-to-image on this machine: latent diffusion with a frozen text encoder against pixel-space
class-conditional diffusion trained for the same CPU time, on the same captioned digits.

    .venv/bin/python benchmarks/text_to_image.py                 # ~45 min: both trainings, both evals
    .venv/bin/python benchmarks/text_to_image.py --quick         # a few minutes: checks the script

1. `genforge data prepare builtin:digits-captions --size 32` (32 x 32; the latent is 8 x 8 x 4).
2. `genforge train configs/latent-diffusion.yaml` (its VAE first, then the UNet), in its own process;
   its wall and CPU time (user + system, children included) are measured.
3. `genforge train configs/diffusion.yaml` on the same images at 32 x 32, in its own process, with
   max_steps sized so that it uses the latent run's CPU time (its step rate is measured in a short
   probe run first), so both had the same CPU budget.
4. `genforge eval` of each (the same domain classifier, trained once on the dataset):
   - latent: prompt-class accuracy on held-out phrasings (English and Chinese templates that no
     training caption used), attribute agreement, FID/KID of class prompts vs the real-vs-real
     floor, inpainting;
   - pixel: class accuracy given the class label, FID/KID vs the same floor (its eval's defaults:
     DDIM-50, guidance 1.5).
5. Sampling speed at the same step count (DDIM-25, classifier-free guidance, 64 images a call),
   each model in its own process, 3 timed calls after a warm-up, median.
Writes benchmarks/results/text_to_image.json (text_to_image_quick.json with --quick) and grids.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, fmt, git_commit, md_table, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GENFORGE = [sys.executable, "-m", "genforge.cli"]
TIMING_STEPS, TIMING_BATCH, TIMING_CALLS = 25, 64, 3


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], log: Path) -> dict:
    """Run a command in its own process; its wall and CPU seconds (raises with the log's tail on failure)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    out = {"command": " ".join(cmd[2:] if cmd[:2] == GENFORGE[:2] else cmd), "wall_s": time.perf_counter() - t0,
           "cpu_s": cpu_seconds() - c0}
    if code != 0:
        raise SystemExit(f"failed ({code}): {out['command']}\n" + log.read_text()[-3000:])
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl that carry an elapsed time."""
    path = run_dir / "metrics.jsonl"
    return [r for line in path.read_text().splitlines() if line.strip() and "elapsed" in (r := json.loads(line))]


def time_sampling(model: str, steps: int, batch: int, calls: int) -> dict:
    """(In its own process.) Seconds per call of `batch` images at `steps` DDIM steps with guidance."""
    import torch

    from genforge.models.text_to_image import is_text_to_image

    if is_text_to_image(model):
        from genforge.models.latent_diffusion import load_text_to_image
        from genforge.models.text_to_image import text_to_image

        pipe = load_text_to_image(model)

        def sample(seed: int):
            return text_to_image(pipe, "a handwritten seven", num_samples=batch, guidance=4.0, steps=steps, seed=seed)
    else:
        from genforge.models.image_generators import load_image_generator

        gen = load_image_generator(model)

        def sample(seed: int):
            return gen.sample(batch, labels=[7] * batch, seed=seed, guidance=1.5, steps=steps, sampler="ddim")
    sample(0)  # warm-up
    times = []
    for k in range(calls):
        t0 = time.perf_counter()
        sample(k + 1)
        times.append(time.perf_counter() - t0)
    return {"steps": steps, "batch": batch, "call_s": times, "images_per_s": batch / statistics.median(times),
            "threads": torch.get_num_threads()}


def train_both(a, work: Path, logs: Path, data: Path, result: dict) -> tuple[dict, dict]:
    """Prepare the data, train the latent run, size and train the pixel run; their stage figures."""
    shutil.rmtree(work / "runs", ignore_errors=True)
    result["stages"]["prepare"] = run([*GENFORGE, "data", "prepare", "builtin:digits-captions", "--size", "32",
                                       "--val-fraction", "0.2", "--out", str(data)], logs / "prepare.log")
    quick_ldm = ["model.vae.steps=60", "train.max_steps=60", "train.eval_every=60", "train.checkpoint_every=60"]
    ldm_sets = [f"dataset={data}", f"out_dir={work / 'runs'}", "name=latent", *(quick_ldm if a.quick else []),
                *a.ldm_set]
    ldm = run([*GENFORGE, "train", "configs/latent-diffusion.yaml", *[x for s in ldm_sets for x in ("--set", s)]],
              logs / "train_latent.log")
    result["stages"]["train_latent"] = ldm

    # The pixel model's seconds per step (from a short probe's log, start-up excluded), then as many
    # steps as the latent run's training loops took (its VAE's and its UNet's): the same time on the
    # same cores; the CPU seconds of both whole processes are measured and printed beside it.
    pix_sets = [f"dataset={data}", f"out_dir={work / 'runs'}"]
    probe_steps = 20 if a.quick else 60
    probe = run([*GENFORGE, "train", "configs/diffusion.yaml", *[x for s in [*pix_sets, "name=pixel-probe",
                 f"train.max_steps={probe_steps}", f"train.eval_every={probe_steps}", "train.log_every=10",
                 f"train.checkpoint_every={probe_steps}"] for x in ("--set", s)]], logs / "train_pixel_probe.log")
    logged = [r for r in read_metrics(work / "runs" / "pixel-probe") if "loss" in r and "elapsed" in r]
    per_step = (logged[-1]["elapsed"] - logged[0]["elapsed"]) / (logged[-1]["step"] - logged[0]["step"])
    loops = [read_metrics(work / "runs" / "latent" / part)[-1]["elapsed"] for part in ("vae", ".")]
    latent_loop_s = sum(loops)
    pixel_steps = max(probe_steps, int(latent_loop_s / per_step))
    result["stages"]["train_pixel_probe"] = {**probe, "steps": probe_steps, "seconds_per_step": per_step}
    ldm["loop_s"] = {"vae": loops[0], "unet": loops[1]}
    every = max(1, pixel_steps // 4)
    pixel = run([*GENFORGE, "train", "configs/diffusion.yaml", *[x for s in [*pix_sets, "name=pixel",
                 f"train.max_steps={pixel_steps}", f"train.eval_every={every}", f"train.checkpoint_every={every}"]
                 for x in ("--set", s)]], logs / "train_pixel.log")
    result["stages"]["train_pixel"] = {**pixel, "steps": pixel_steps}

    return ldm, pixel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny trainings: checks the script, figures are noise")
    ap.add_argument("--work-dir", default=str(ROOT / ".cache" / "bench-t2i"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--ldm-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides of configs/latent-diffusion.yaml")
    ap.add_argument("--eval-only", action="store_true", help="reuse the trained runs in --work-dir and the training "
                    "figures of the last result JSON; evaluate and time again")
    ap.add_argument("--time-sampling", default=None, help=argparse.SUPPRESS)  # the timing child process
    a = ap.parse_args()
    if a.time_sampling:
        print(json.dumps(time_sampling(a.time_sampling, TIMING_STEPS, TIMING_BATCH, TIMING_CALLS)))
        return 0
    work = Path(a.work_dir)
    logs = work / "logs"
    data = work / "digits-captions"
    out_path = Path(a.out) if a.out else RESULTS / ("text_to_image_quick.json" if a.quick else "text_to_image.json")
    result: dict = {"benchmark": "text_to_image", "quick": a.quick, "cpu": cpu_info(), "stages": {}}
    t_start = time.perf_counter()
    if a.eval_only:
        before = json.loads(out_path.read_text())
        result["stages"] = {k: v for k, v in before["stages"].items() if not k.startswith("eval")}
        result["eval_only_of"] = before.get("git")
        ldm, pixel = result["stages"]["train_latent"], result["stages"]["train_pixel"]
    else:
        ldm, pixel = train_both(a, work, logs, data, result)
    runs = work / "runs"
    n_eval = "60" if a.quick else "300"
    result["stages"]["eval_latent"] = run([*GENFORGE, "eval", str(runs / "latent"), "--num-samples", n_eval],
                                          logs / "eval_latent.log")
    result["stages"]["eval_pixel"] = run([*GENFORGE, "eval", str(runs / "pixel"), "--num-samples", n_eval],
                                         logs / "eval_pixel.log")
    latent = json.loads((runs / "latent" / "eval" / "text_image_metrics.json").read_text())
    pixel_eval = json.loads((runs / "pixel" / "eval" / "image_metrics.json").read_text())
    latent["heldout"].pop("records", None)  # per-image rows stay in the run
    result["latent"], result["pixel"] = latent, pixel_eval

    timing = {}
    for name in ("latent", "pixel"):
        out = subprocess.run([sys.executable, __file__, "--time-sampling", str(runs / name)], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        timing[name] = json.loads(out.stdout.strip().splitlines()[-1])
    result["sampling"] = timing

    s, p = latent["summary"], pixel_eval["summary"]
    h = latent["heldout"]
    rows = [
        [f"latent diffusion (text), g={latent['guidance']:g}", f"{ldm['cpu_s'] / 60:.1f} / {ldm['wall_s'] / 60:.1f}",
         f"{100 * s['heldout_class_accuracy']:.1f}%", f"{100 * s['heldout_class_accuracy_en']:.1f}%",
         f"{100 * s['heldout_class_accuracy_zh']:.1f}%", f"{100 * s['class_prompt_accuracy']:.1f}%",
         fmt(s.get("fid"), ".3f"), fmt(s.get("floor_fid"), ".3f"), fmt(s.get("fid_over_floor"), ".2f"),
         fmt(timing["latent"]["images_per_s"], ".1f")],
        *[[f"latent diffusion, class prompts at g={r['guidance']:g}", None, None, None, None,
           f"{100 * r['class_accuracy']:.1f}%", fmt(r.get("fid"), ".3f"), fmt(s.get("floor_fid"), ".3f"),
           fmt(r["fid"] / s["floor_fid"], ".2f") if r.get("fid") else None, None]
          for r in latent["class_prompts"]["rows"]],
        ["pixel diffusion (class label), g=1.5", f"{pixel['cpu_s'] / 60:.1f} / {pixel['wall_s'] / 60:.1f}", None, None, None,
         f"{100 * p['class_accuracy']:.1f}%", fmt(p.get("fid"), ".3f"), fmt(p.get("floor_fid"), ".3f"),
         fmt(p.get("fid_over_floor"), ".2f"), fmt(timing["pixel"]["images_per_s"], ".1f")],
    ]
    table = md_table(["model", "train CPU / wall min", "held-out prompts: class acc", "English", "Chinese",
                      "class prompt / label acc", "FID", "floor FID", "FID / floor",
                      f"images/s (DDIM-{TIMING_STEPS}, batch {TIMING_BATCH})"], rows)
    attrs = md_table(["attribute asked (held-out prompts)", "images", "agreement (chance 33%)", "English", "Chinese"],
                     [[a, v["images"], fmt(100 * v["agreement"], ".1f") + "%" if v["agreement"] is not None else None,
                       *[fmt(100 * v["by_language"][lang], ".1f") + "%" if v["by_language"][lang] is not None
                         else None for lang in ("en", "zh")]] for a, v in h["attributes"].items()])
    inp = latent["inpainting"]
    inpaint_line = (f"Inpainting (centre quarter of {inp['images']} held-out images): own-class prompt "
                    f"{100 * inp['own class']['class_accuracy']:.1f}%, other-class prompt "
                    f"{100 * inp['another class']['class_accuracy']:.1f}% classified as the prompted class; largest "
                    f"unmasked change {max(inp['own class']['unmasked_max_error'], inp['another class']['unmasked_max_error']):.0f}"
                    f"; VAE round trip there {inp['vae_round_trip_unmasked_mae']:.2f} MAE (0-255).")
    result["table"] = "\n\n".join([table, attrs, inpaint_line])
    print("\n" + result["table"])
    for i, name in enumerate(("held-out prompts", "class prompts", "inpainting")):
        src = runs / "latent" / "plots" / f"eval-t2i-{i}.png"
        if src.is_file() and not a.quick:
            shutil.copy(src, RESULTS / f"t2i_{name.replace(' ', '_').replace('-', '')}.png")
    result.update(total_s=time.perf_counter() - t_start, git=git_commit(ROOT),
                  versions=versions("torch", "diffusers", "transformers", "genforge"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.rename(out_path)
    print(f"wrote {out_path} ({result['total_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
