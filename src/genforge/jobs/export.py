"""`genforge export RUN --format onnx [--out DIR] [--quantize int8]`: a folder onnxruntime generates from.

    DIR/model.onnx            the LM (KV cache in and out) or the UNet (models/onnx_export.py)
    DIR/genforge_export.json  what was exported, from where, opset, inputs/outputs, versions, and the
                              parity against PyTorch measured here (max abs difference of the logits over
                              a prompt and over cached decode steps; of the UNet's noise predictions)
    LM:                       config.json, generation_config.json and the tokenizer files
    diffusion UNet:           unet/config.json, scheduler/, genforge.json (class names)
    text-to-image:            the pipeline folder (text encoder, VAE, tokenizer, scheduler; they stay PyTorch)
                              with unet/config.json only: the UNet's weights are in model.onnx

The folder is written to a temp folder and renamed, so a failed export leaves nothing; `--out` must be
new or empty. `--quantize int8` runs onnxruntime's dynamic quantization on the exported graph, and the
parity figures then say what int8 costs (and, for an LM, whether the greedy tokens still agree).
`genforge generate DIR` (or `generate RUN --backend onnxruntime`, which reads RUN/onnx) runs it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from genforge.common.config import IMAGE_FAMILIES
from genforge.common.errors import ConfigError, RunError
from genforge.common.runs import RunDir, atomic_dir, atomic_write_text
from genforge.models import onnx_export as ox
from genforge.models.onnx_runtime import EXPORT_FILE, MODEL_FILE, OrtCausalLM, OrtUNet, is_export_folder

FORMATS = ("onnx",)
QUANTIZATIONS = ("int8",)
PARITY_PROMPT = "The with statement"  # short and plain: any tokenizer, char-level too, reads it
DECODE_STEPS = 8  # cached decode steps compared after the prompt


def default_export_dir(run: str | Path) -> Path:
    """Where `export` writes without --out and `generate --backend onnxruntime` looks: RUN/onnx."""
    return Path(run) / "onnx"


def export_kind(run: str | Path) -> str:
    """"causal-lm", "unet" (class-conditional diffusion) or "text-unet" (latent diffusion) for a run or
    model folder; RunError for anything else, saying what is exportable."""
    from genforge.models.text_to_image import is_text_to_image

    path = Path(run)
    if is_export_folder(path):
        raise RunError(f"{path} is already an ONNX export; export the run it came from")
    if not path.exists():
        raise RunError(f"not found: {path} (expected a run directory or a model folder)")
    if is_text_to_image(path):
        return "text-unet"
    run_dir = RunDir(path)
    family = str(run_dir.read_recipe().get("family", "lm")) if run_dir.recipe_path.is_file() else None
    if family is None and (path / "unet" / "config.json").is_file():
        family = "diffusion"  # a diffusion model folder outside its run
    if family == "diffusion":
        return "unet"
    if family in IMAGE_FAMILIES:
        raise RunError(f"{path}: a {family} run is not exportable to ONNX; export takes language models and "
                       f"diffusion UNets (families lm/sft/dpo/..., diffusion, latent-diffusion)")
    return "causal-lm"


def export_run(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, quantize: str | None = None,
               opset: int = ox.OPSET) -> dict:
    """Export a run (or an HF causal-LM / diffusion model folder) to `out`; the export record."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: unknown export format; supported: {', '.join(FORMATS)}", param="format")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize {quantize!r}: supported: {', '.join(QUANTIZATIONS)} (onnxruntime's "
                          "dynamic quantization)", param="quantize")
    if not 14 <= opset <= 23:
        raise ConfigError(f"--opset {opset}: the dynamo exporter writes opsets 14..23 (default {ox.OPSET})",
                          param="opset")
    ox.require("onnx", "onnxscript", "onnxruntime")
    out = Path(out) if out is not None else default_export_dir(run)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new folder (export never "
                          "overwrites)", param="out")
    kind = export_kind(run)
    with atomic_dir(out) as tmp:
        exporters = {"causal-lm": _export_lm, "unet": _export_unet, "text-unet": _export_text_unet}
        record = exporters[kind](Path(run), tmp, quantize, opset)
        record = {"format": "onnx", "kind": kind, "source": str(Path(run).resolve()), "opset": opset,
                  "exporter": "torch.onnx.export (dynamo)", "quantization": quantize, **record,
                  "versions": _versions()}
        atomic_write_text(tmp / EXPORT_FILE, json.dumps(record, indent=2))
        _check_reads(tmp, kind)
    record["out"] = str(out)
    return record


def _export_graph(export, module: torch.nn.Module, folder: Path, quantize: str | None, opset: int) -> dict:
    """`export(module, path, opset)` to folder/model.onnx: as is, or into an fp32 file that int8
    quantization reads and then drops."""
    target = folder / MODEL_FILE
    if quantize is None:
        return export(module, target, opset)
    fp32 = folder / "model.fp32.onnx"
    io = export(module, fp32, opset)
    ox.quantize_int8(fp32, target)
    fp32.unlink()
    return io


# --------------------------------------------------------------------------------------- the LM

def _export_lm(run: Path, folder: Path, quantize: str | None, opset: int) -> dict:
    from genforge.models.lm import context_length, load_lm, model_folder
    from genforge.models.quantize import read_marker

    source = model_folder(run)
    if (method := read_marker(source)) is not None:
        raise RunError(f"{run} was quantized by `genforge quantize` ({method}), which ONNX cannot hold; export "
                       f"its source run (add --quantize int8 for onnxruntime's int8)")
    model, tokenizer = load_lm(run)  # fp32, eval mode
    io = _export_graph(ox.export_causal_lm, model, folder, quantize, opset)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    max_len = context_length(model)
    # a provisional record, so onnxruntime opens the folder for the parity check; export_run replaces it
    atomic_write_text(folder / EXPORT_FILE, json.dumps({"kind": "causal-lm", "io": io, "max_model_len": max_len}))
    parity = lm_parity(model, tokenizer, OrtCausalLM(folder, threads=1))
    return {"model": type(model).__name__, "io": io, "max_model_len": max_len, "parity": parity}


@torch.no_grad()
def lm_parity(model: torch.nn.Module, tokenizer, lm: OrtCausalLM, steps: int = DECODE_STEPS) -> dict:
    """Max abs difference of the logits, PyTorch vs onnxruntime, over PARITY_PROMPT and then over `steps`
    cached decode steps fed PyTorch's greedy tokens; and how many of onnxruntime's greedy picks agree."""
    ids = list(tokenizer(PARITY_PROMPT)["input_ids"]) or [tokenizer.bos_token_id or 0]
    ids = ids[:max(1, lm.max_model_len - steps - 1)]
    out = model(torch.tensor([ids]), use_cache=True)
    prefill = float((out.logits[0].float() - lm.prefill(ids)).abs().max())
    decode, agree, cache = 0.0, 0, out.past_key_values
    token = int(out.logits[0, -1].argmax())
    for _ in range(steps):
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        ours = lm.step(token)
        decode = max(decode, float((out.logits[0, -1].float() - ours).abs().max()))
        agree += int(ours.argmax()) == int(out.logits[0, -1].argmax())
        cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
    return {"prompt_tokens": len(ids), "decode_steps": steps, "logits_max_abs_diff_prompt": prefill,
            "logits_max_abs_diff_decode": decode, "greedy_agreement": f"{agree}/{steps}"}


# --------------------------------------------------------------------------------------- UNets

def _export_unet(run: Path, folder: Path, quantize: str | None, opset: int) -> dict:
    from genforge.models.diffusion import META_FILE, load_diffusion, model_folder

    model = load_diffusion(run)
    io = _export_graph(ox.export_unet, model.unet, folder, quantize, opset)
    source = model_folder(run)
    (folder / "unet").mkdir()
    shutil.copy2(source / "unet" / "config.json", folder / "unet" / "config.json")
    model.scheduler.save_pretrained(folder / "scheduler")
    if (source / META_FILE).is_file():
        shutil.copy2(source / META_FILE, folder / META_FILE)
    example = ox.unet_example(model.unet, batch=4, seed=1,
                              num_train_timesteps=int(model.scheduler.config.num_train_timesteps))
    return {"model": type(model.unet).__name__, "io": io, "parity": unet_parity(model.unet, folder, io, example)}


def _export_text_unet(run: Path, folder: Path, quantize: str | None, opset: int) -> dict:
    from genforge.models.latent_diffusion import model_folder
    from genforge.models.text_to_image import load_pipeline

    pipe = load_pipeline(run)
    io = _export_graph(ox.export_unet, pipe.unet, folder, quantize, opset)
    source = model_folder(run)
    # the pipeline folder without the UNet's weights (model.onnx holds them); its config stays for diffusers
    shutil.copytree(source, folder, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if Path(d).name == "unet" and n != "config.json"])
    example = ox.unet_example(pipe.unet, batch=2, seed=1,
                              num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps))
    with torch.no_grad():  # the noise prediction conditioned on real text states: a caption and the empty one
        example["encoder_hidden_states"] = pipe.encode_prompt(["a handwritten seven", ""], "cpu", 1, False)[0]
    return {"model": type(pipe.unet).__name__, "io": io, "parity": unet_parity(pipe.unet, folder, io, example)}


@torch.no_grad()
def unet_parity(unet: torch.nn.Module, folder: Path, io: dict, example: dict) -> dict:
    """Max abs difference of the noise predictions, PyTorch vs onnxruntime, on `example` (random latents at
    timesteps spread over the schedule, with their conditioning)."""
    # a provisional record, so onnxruntime opens the folder; export_run replaces it
    atomic_write_text(folder / EXPORT_FILE, json.dumps({"kind": "unet", "io": io}))
    cond = {k: v for k, v in example.items() if k not in ("sample", "timestep")}
    ref = unet(example["sample"], example["timestep"], **cond).sample
    ours = OrtUNet(folder, threads=1)(example["sample"], example["timestep"], **cond).sample
    return {"batch": int(example["sample"].shape[0]), "timesteps": [int(t) for t in example["timestep"]],
            "noise_pred_max_abs_diff": float((ref - ours).abs().max()),
            "noise_pred_max_abs": float(ref.abs().max())}


# --------------------------------------------------------------------------------------- the record

def _check_reads(folder: Path, kind: str) -> None:
    """The folder as `generate` will read it (the record complete): a session opens on it."""
    if kind == "causal-lm":
        OrtCausalLM(folder, threads=1)
    else:
        OrtUNet(folder, threads=1)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
           "transformers": transformers.__version__}
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return out
