"""benchmarks/scale.py's "onnx" section (run it as `benchmarks/scale.py --only onnx`).

onnx: PyTorch vs onnxruntime (fp32, and int8 from onnxruntime's quantize_dynamic) on this CPU.
- LM decode tokens/s, batch 1: lm-tiny (random weights, 4096-token BPE; speed does not depend on the
  weights), a fixed 16-token prompt, 64 greedy tokens with EOS ignored. PyTorch runs `genforge generate`'s
  path twice: the Llama fast path (models/fastdecode.py, the default) and the model's own HF forward with
  its DynamicCache; onnxruntime runs `generate --backend onnxruntime` (models/onnx_runtime.py), the export
  of `genforge export`. Decode = the tokens after the first one, over the time after the first one.
- Images/s of the class-conditional diffusion pipeline: the default diffusion UNet (UNet2DModel, levels
  32/64/64, attention at the last; random weights) at 8x8x1 (the digits size), 16 images, 20 DDIM steps,
  guidance 3 (two UNet rows per image and step), the scheduler loop in Python for every contender.

Each contender runs in its own process with the same thread count (torch.set_num_threads and
onnxruntime's intra-op threads; recorded), after a warm-up; the median of the timed repeats is reported,
wall and CPU time (the machine may be shared: CPU time is the steadier figure). The exports are made
once in this process by `genforge export`'s job, and their parity figures are recorded with the speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, md_table  # noqa: E402

# ------------------------------------------------------------------------------------------ onnx

PROMPT_TOKENS = 16
NEW_TOKENS = 64
IMAGES, IMAGE_STEPS, GUIDANCE = 16, 20, 3.0


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def onnx_worker(cfg: dict) -> dict:
    """One contender in this (fresh) process: {"kind": "lm" | "unet", "backend": "torch-fast" | "torch-hf" |
    "onnxruntime", "path": model or export folder, "threads", "repeats"}."""
    import torch

    torch.set_num_threads(cfg["threads"])
    if cfg["kind"] == "lm":
        return _lm_worker(cfg)
    return _unet_worker(cfg)


def _lm_worker(cfg: dict) -> dict:
    from genforge.models.generation import BatchGenerator, SamplingParams
    from genforge.models.onnx_runtime import OrtCausalLM, generate_onnx

    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    if cfg["backend"] == "onnxruntime":
        lm = OrtCausalLM(cfg["path"], threads=cfg["threads"])
        prompt = lm.tokenizer("The with statement is used to wrap the execution of a block")["input_ids"]
        run = lambda ids: generate_onnx(lm, ids, params)  # noqa: E731
    else:
        from genforge.models.lm import load_lm

        model, tok = load_lm(cfg["path"])
        gen = BatchGenerator(model, tok, max_batch_size=1, fast=cfg["backend"] == "torch-fast")
        prompt = tok("The with statement is used to wrap the execution of a block")["input_ids"]
        run = lambda ids: gen.generate(ids, params)  # noqa: E731
    prompt = (prompt * PROMPT_TOKENS)[:PROMPT_TOKENS]

    def once() -> dict:
        w0 = time.perf_counter()
        first = None
        tokens = []
        for event in run(prompt):
            tokens.append(event.token_id)
            if first is None:
                first = (time.perf_counter(), time.process_time())
        w1, c1 = time.perf_counter(), time.process_time()
        return {"tokens": tokens, "first_token_s": first[0] - w0, "decode_wall_s": w1 - first[0],
                "decode_cpu_s": c1 - first[1], "total_wall_s": w1 - w0}

    once()  # warm-up: allocations, kernel choice
    runs = [once() for _ in range(cfg["repeats"])]
    n = NEW_TOKENS - 1
    return {"decode_tok_per_s": statistics.median(n / r["decode_wall_s"] for r in runs),
            "decode_tok_per_cpu_s": statistics.median(n / r["decode_cpu_s"] for r in runs),
            "first_token_ms": statistics.median(r["first_token_s"] for r in runs) * 1e3,
            "end_to_end_tok_per_s": statistics.median(NEW_TOKENS / r["total_wall_s"] for r in runs),
            "tokens": runs[0]["tokens"]}


def _unet_worker(cfg: dict) -> dict:
    if cfg["backend"] == "onnxruntime":
        from genforge.models.onnx_runtime import load_onnx_diffusion

        model = load_onnx_diffusion(cfg["path"], threads=cfg["threads"])
    else:
        from genforge.models.diffusion import load_diffusion

        model = load_diffusion(cfg["path"])
    labels = [i % model.num_classes for i in range(IMAGES)]
    sample = lambda: model.sample(IMAGES, labels=labels, guidance=GUIDANCE, steps=IMAGE_STEPS, seed=0)  # noqa: E731
    sample()  # warm-up
    runs = [_timed(sample) for _ in range(cfg["repeats"])]
    images = runs[0][2]
    return {"images_per_s": statistics.median(IMAGES / w for w, _, _ in runs),
            "images_per_cpu_s": statistics.median(IMAGES / c for _, c, _ in runs),
            "images_sum": float(images.sum()), "images_head": images.flatten()[:64].tolist()}


def _spawn(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"]), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr or proc.stdout)[-800:]}


def _lm_folder() -> Path:
    folder = CACHE / "runs" / "lm-tiny-0" / "model"
    if not (folder / "config.json").is_file():
        from serve_throughput import random_lm_tiny

        random_lm_tiny(folder)
    return folder


def _diffusion_folder() -> Path:
    """The default diffusion UNet (DiffusionSpec's defaults) at the digits' 8x8x1, 10 classes, random weights."""
    folder = CACHE / "runs" / "diffusion-default-8px" / "model"
    if not (folder / "unet" / "config.json").is_file():
        import torch

        from genforge.models.diffusion import DiffusionModel, DiffusionSpec, build_scheduler, build_unet

        spec = DiffusionSpec().resolved(sample_size=8, channels=1, num_classes=10)
        torch.manual_seed(0)
        DiffusionModel(build_unet(spec), build_scheduler(spec)).save(folder)
    return folder


def onnx_section(args: argparse.Namespace) -> dict:
    """Export lm-tiny and the diffusion UNet (fp32 and int8), then time every contender in its own process."""
    import torch

    from genforge.jobs.export import export_run

    torch.set_num_threads(args.threads)
    exports = Path(tempfile.mkdtemp(prefix="gf-onnx-bench-"))
    lm, unet = _lm_folder(), _diffusion_folder()
    records: dict = {}
    for name, source in (("lm", lm), ("unet", unet)):
        for quant in (None, "int8"):
            t0 = time.perf_counter()
            r = export_run(source, "onnx", exports / f"{name}-{quant or 'fp32'}", quantize=quant)
            r["export_wall_s"] = time.perf_counter() - t0
            r["model_onnx_bytes"] = (Path(r["out"]) / "model.onnx").stat().st_size
            records[f"{name}-{quant or 'fp32'}"] = r
            print(f"exported {name} {quant or 'fp32'} in {r['export_wall_s']:.0f} s: {r['parity']}", flush=True)
    common = {"threads": args.threads, "repeats": args.repeats}
    contenders = [("lm", "PyTorch, genforge fast path", "torch-fast", lm),
                  ("lm", "PyTorch, HF forward + DynamicCache", "torch-hf", lm),
                  ("lm", "onnxruntime fp32", "onnxruntime", exports / "lm-fp32"),
                  ("lm", "onnxruntime int8", "onnxruntime", exports / "lm-int8"),
                  ("unet", "PyTorch", "torch", unet),
                  ("unet", "onnxruntime fp32", "onnxruntime", exports / "unet-fp32"),
                  ("unet", "onnxruntime int8", "onnxruntime", exports / "unet-int8")]
    rows = []
    for kind, label, backend, path in contenders:
        r = _spawn({"kind": kind, "backend": backend, "path": str(path), **common})
        rows.append({"kind": kind, "contender": label, "backend": backend, "path": str(path), **r})
        print(f"{kind} {label}: {r.get('decode_tok_per_s', r.get('images_per_s', float('nan'))):.1f} "
              f"{r.get('error', '')}", flush=True)
    _agreement(rows)
    shutil.rmtree(exports, ignore_errors=True)
    return {"section": "onnx", "threads": args.threads, "repeats": args.repeats,
            "lm": {"model": str(lm), "preset": "lm-tiny (random weights)", "prompt_tokens": PROMPT_TOKENS,
                   "new_tokens": NEW_TOKENS, "batch": 1, "sampling": "greedy, EOS ignored"},
            "unet": {"model": str(unet), "spec": "DiffusionSpec defaults at 8x8x1, 10 classes (random weights)",
                     "images": IMAGES, "ddim_steps": IMAGE_STEPS, "guidance": GUIDANCE},
            "exports": records, "rows": rows,  # each record's "out" was a temp folder, removed after the run
            "method": "each contender a fresh process, the same threads (torch.set_num_threads, OMP_NUM_THREADS, "
                      "onnxruntime intra_op_num_threads; inter_op 1); one warm-up, median of the repeats; "
                      "decode = tokens 2..N over the time after the first token"}


def _agreement(rows: list[dict]) -> None:
    """Whether each contender produced what PyTorch did: the same greedy tokens; images' max difference."""
    ref_lm = next((r for r in rows if r["backend"] == "torch-fast" and "tokens" in r), None)
    ref_img = next((r for r in rows if r["kind"] == "unet" and r["backend"] == "torch" and "images_head" in r), None)
    for r in rows:
        if r["kind"] == "lm" and ref_lm and "tokens" in r:
            same = sum(a == b for a, b in zip(r["tokens"], ref_lm["tokens"]))
            r["greedy_tokens_as_pytorch"] = f"{same}/{len(ref_lm['tokens'])}"
        if r["kind"] == "unet" and ref_img and "images_head" in r:
            r["pixels_max_abs_diff_vs_pytorch"] = max(abs(a - b) for a, b in zip(r["images_head"], ref_img["images_head"]))


def print_onnx(result: dict) -> None:
    f = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
    lm_rows = [r for r in result["rows"] if r["kind"] == "lm"]
    # ratios of CPU time: on a shared machine a process waits for a core, which wall time counts
    base = next((r.get("decode_tok_per_cpu_s") for r in lm_rows if r["backend"] == "torch-fast"), None)
    lm = result["lm"]
    print(f"\n## LM decode, {lm['preset']}, batch 1, {lm['prompt_tokens']}-token prompt, {lm['new_tokens']} greedy "
          f"tokens, {result['threads']} thread(s)\n")
    print(md_table(["contender", "decode tok/s", "tok/CPU-s", "vs fast path (CPU)", "first token ms",
                    "greedy tokens as PyTorch"],
                   [[r["contender"], f(r.get("decode_tok_per_s")), f(r.get("decode_tok_per_cpu_s")),
                     f(r["decode_tok_per_cpu_s"] / base, 2) + "x" if base and r.get("decode_tok_per_cpu_s") else None,
                     f(r.get("first_token_ms")), r.get("greedy_tokens_as_pytorch", r.get("error", "")[:60])]
                    for r in lm_rows]))
    img_rows = [r for r in result["rows"] if r["kind"] == "unet"]
    ibase = next((r.get("images_per_cpu_s") for r in img_rows if r["backend"] == "torch"), None)
    u = result["unet"]
    print(f"\n## Diffusion pipeline, default UNet at 8x8x1, {u['images']} images, {u['ddim_steps']} DDIM steps, "
          f"guidance {u['guidance']:g}, {result['threads']} thread(s)\n")
    print(md_table(["contender", "images/s", "images/CPU-s", "vs PyTorch (CPU)", "max pixel diff vs PyTorch ([-1, 1])"],
                   [[r["contender"], f(r.get("images_per_s"), 2), f(r.get("images_per_cpu_s"), 2),
                     f(r["images_per_cpu_s"] / ibase, 2) + "x" if ibase and r.get("images_per_cpu_s") else None,
                     f(r.get("pixels_max_abs_diff_vs_pytorch"), 4) if "images_head" in r else r.get("error", "")[:60]]
                    for r in img_rows]))
    print("\n## Exports (parity against PyTorch measured at export time)\n")
    print(md_table(["export", "model.onnx MiB", "export s", "max abs diff (logits prompt / decode, or noise)",
                    "greedy agreement"],
                   [[name, f(r["model_onnx_bytes"] / 2**20, 2), f(r["export_wall_s"], 0),
                     " / ".join(f"{r['parity'][k]:.2g}" for k in ("logits_max_abs_diff_prompt",
                                                                  "logits_max_abs_diff_decode",
                                                                  "noise_pred_max_abs_diff") if k in r["parity"]),
                     r["parity"].get("greedy_agreement", "—")] for name, r in result["exports"].items()]))


def add_onnx_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=1, help="onnx: threads of every contender (torch and onnxruntime)")
    ap.add_argument("--repeats", type=int, default=5, help="onnx: timed repeats per contender")


if __name__ == "__main__":  # a contender's own process (see _spawn)
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True)
    print("RESULT " + json.dumps(onnx_worker(json.loads(ap.parse_args().worker))), flush=True)
