"""genforge export --format onnx and generate --backend onnxruntime: parity with PyTorch (logits over a prompt
and over cached decode steps; UNet noise predictions), end to end through the CLI for a trained LM run and a
class-conditional diffusion run, and the bad input a user can give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from genforge.cli import main
from genforge.common.errors import ConfigError, RunError
from genforge.jobs.export import export_run, lm_parity
from genforge.jobs.train import run_recipe
from genforge.models.generation import SamplingParams, generate
from genforge.models.lm import load_lm
from genforge.models.onnx_runtime import OrtCausalLM, OrtUNet, generate_onnx, make_session
from tests.conftest import make_tiny_recipe

PARITY = 1e-4  # fp32: the same arithmetic, reordered by onnxruntime's kernels


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, char_dataset) -> Path:
    root = tmp_path_factory.mktemp("export-lm")
    return run_recipe(make_tiny_recipe(root, char_dataset, name="lm", max_steps=10, eval_every=10,
                                       checkpoint_every=10)).run.path


@pytest.fixture(scope="module")
def lm_export(lm_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-lm-out") / "onnx"
    assert main(["export", str(lm_run), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_lm_export_folder_and_record(lm_export, lm_run):
    names = {p.name for p in lm_export.iterdir()}
    assert {"model.onnx", "genforge_export.json", "config.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # nothing half-written left beside it
    record = json.loads((lm_export / "genforge_export.json").read_text())
    assert record["kind"] == "causal-lm" and record["opset"] == 18 and record["quantization"] is None
    assert record["source"] == str(lm_run.resolve()) and record["versions"]["onnxruntime"]
    assert record["parity"]["logits_max_abs_diff_prompt"] < PARITY
    assert record["parity"]["logits_max_abs_diff_decode"] < PARITY
    session = make_session(lm_export / "model.onnx", threads=1)
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    layers = record["io"]["num_layers"]
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids"} | {
        f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")}
    assert set(outputs) == {"logits"} | {f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")}
    assert all(isinstance(d, str) for d in inputs["input_ids"])  # batch and sequence are dynamic
    assert isinstance(inputs["past_key_values.0.key"][2], str)  # and the past length


@torch.no_grad()
def test_lm_logits_match_pytorch_over_prompt_and_cached_steps(lm_export, lm_run):
    model, tok = load_lm(lm_run)
    lm = OrtCausalLM(lm_export, threads=1)
    parity = lm_parity(model, tok, lm, steps=12)
    assert parity["logits_max_abs_diff_prompt"] < PARITY and parity["logits_max_abs_diff_decode"] < PARITY
    assert parity["greedy_agreement"] == "12/12"
    # a batch of two rows through the same graph (batch is a dynamic axis): each row as PyTorch gives it
    ids = torch.tensor([tok.encode("def f(x):")[:8], tok.encode("import os")[:8]])
    ref = model(ids).logits
    layers, heads, dim = lm.num_layers, lm.kv_heads, lm.head_dim
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64),
            "position_ids": np.tile(np.arange(ids.shape[1]), (2, 1))}
    feed |= {n: np.zeros((2, heads, 0, dim), np.float32) for n in lm.input_names[3:]}
    ours = lm.session.run(["logits"], feed)[0]
    assert np.abs(ours - ref.numpy()).max() < PARITY and layers == model.config.num_hidden_layers


def test_onnx_generation_gives_pytorchs_tokens_greedy_and_sampled(lm_export, lm_run):
    model, tok = load_lm(lm_run)
    lm = OrtCausalLM(lm_export, threads=1)
    prompt = tok.encode("The ")
    for params in (SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=20, seed=5, ignore_eos=True)):
        ours = [e.token_id for e in generate_onnx(lm, prompt, params)]
        ref = [e.token_id for e in generate(model, tok, prompt, params)]
        assert ours == ref and len(ours) == 16
    # the context ends where the model's does: finish "length" at max_model_len, not an onnxruntime error
    long = list(generate_onnx(lm, prompt, SamplingParams(max_new_tokens=500, temperature=0.0, ignore_eos=True)))
    assert len(prompt) + len(long) == lm.max_model_len and long[-1].finish_reason == "length"


def test_cli_generate_onnx_prints_what_the_torch_backend_prints(lm_export, lm_run, capsys):
    args = ["--prompt", "The ", "--max-new-tokens", "10", "--seed", "3", "--num-samples", "2"]
    assert main(["generate", str(lm_export), *args]) == 0  # an export folder: onnxruntime by default
    onnx_out = capsys.readouterr()
    assert main(["generate", str(lm_run), *args]) == 0
    torch_out = capsys.readouterr()
    assert onnx_out.out == torch_out.out and onnx_out.out.count("--- sample") == 2
    assert "onnxruntime fp32" in onnx_out.err


def test_cli_generate_backend_errors(lm_export, lm_run, capsys):
    assert main(["generate", str(lm_export), "--backend", "torch", "--prompt", "x"]) == 2
    assert "is an ONNX export; it runs on onnxruntime" in capsys.readouterr().err
    assert main(["generate", str(lm_run), "--backend", "onnxruntime", "--prompt", "x"]) == 2  # no RUN/onnx
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"genforge export {lm_run} --format onnx" in err


# --------------------------------------------------------------------------- a class-conditional diffusion run

@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory) -> Path:
    """A random-init class-conditional diffusion run (UNet2DModel, 10 classes + null, 8x8x1)."""
    from genforge.models.diffusion import DiffusionModel, DiffusionSpec, build_scheduler, build_unet

    run = tmp_path_factory.mktemp("export-diff") / "diff"
    spec = DiffusionSpec(block_out_channels=[16, 32], layers_per_block=1, attention_levels=[1], norm_groups=8,
                         num_train_timesteps=100).resolved(sample_size=8, channels=1, num_classes=10)
    torch.manual_seed(0)
    DiffusionModel(build_unet(spec), build_scheduler(spec), [f"c{i}" for i in range(10)]).save(run / "model")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "diff", "family": "diffusion"}))
    return run


@pytest.fixture(scope="module")
def diffusion_export(diffusion_run) -> Path:
    assert main(["export", str(diffusion_run), "--format", "onnx"]) == 0  # default --out: RUN/onnx
    return diffusion_run / "onnx"


@torch.no_grad()
def test_unet_noise_prediction_matches_pytorch(diffusion_export, diffusion_run):
    from diffusers import UNet2DModel

    record = json.loads((diffusion_export / "genforge_export.json").read_text())
    assert record["kind"] == "unet" and record["io"]["condition"] == "class_labels"
    assert record["parity"]["noise_pred_max_abs_diff"] < PARITY
    assert {"scheduler", "unet", "genforge.json"} <= {p.name for p in diffusion_export.iterdir()}
    unet = UNet2DModel.from_pretrained(diffusion_run / "model" / "unet").eval()
    ours = OrtUNet(diffusion_export, threads=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 3, 9, 10, 10])  # 10: the null class
    for t in (torch.tensor(99), torch.tensor([0, 10, 50, 75, 99])):  # one timestep for all, or one each
        diff = (unet(x, t, class_labels=labels).sample - ours(x, t, class_labels=labels).sample).abs().max()
        assert diff < PARITY


def test_cli_generate_images_onnx_like_torch(diffusion_export, diffusion_run, tmp_path):
    common = ["--num-samples", "4", "--class", "c3", "--guidance", "2", "--steps", "4", "--seed", "1"]
    assert main(["generate", str(diffusion_run), "--backend", "onnxruntime", *common,
                 "--out", str(tmp_path / "onnx.png")]) == 0
    assert main(["generate", str(diffusion_run), *common, "--out", str(tmp_path / "torch.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "onnx.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "torch.png"), dtype=int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # DDIM is deterministic: the same images
    assert json.loads((tmp_path / "onnx.json").read_text())["backend"] == "onnxruntime"
    assert main(["generate", str(diffusion_export), *common]) == 2  # an export folder outside a run needs --out


# --------------------------------------------------------------------------- bad input

def test_bad_export_requests(lm_run, lm_export, tmp_path, capsys):
    cases = [
        (["export", str(lm_run), "--format", "tflite", "--out", str(tmp_path / "a")], "unknown export format"),
        (["export", str(lm_run), "--out", str(lm_export)], "already exists and is not empty"),
        (["export", str(lm_run), "--quantize", "int4", "--out", str(tmp_path / "b")], "--quantize 'int4'"),
        (["export", str(lm_export), "--out", str(tmp_path / "c")], "is already an ONNX export"),
        (["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "d")], "not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_image_runs_other_than_diffusion_are_not_exportable(tmp_path):
    run = tmp_path / "vae"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "vae", "family": "vae"}))
    with pytest.raises(RunError, match="a vae run is not exportable to ONNX"):
        export_run(run, "onnx", tmp_path / "out")
    with pytest.raises(ConfigError, match="--opset 9"):
        export_run(run, "onnx", tmp_path / "out", opset=9)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- slow: int8 and text-to-image

@pytest.mark.slow
def test_int8_export_is_smaller_and_still_generates(lm_run, lm_export, tmp_path):
    record = export_run(lm_run, "onnx", tmp_path / "int8", quantize="int8")
    assert record["quantization"] == "int8" and not (tmp_path / "int8" / "model.fp32.onnx").exists()
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < (lm_export / "model.onnx").stat().st_size
    parity = record["parity"]
    assert 0 < parity["logits_max_abs_diff_prompt"] < 1.0  # int8 moves the logits, not beyond recognition
    _, tok = load_lm(lm_run)
    lm = OrtCausalLM(tmp_path / "int8", threads=1)
    events = list(generate_onnx(lm, tok.encode("The "), SamplingParams(max_new_tokens=8, temperature=0.0,
                                                                      ignore_eos=True)))
    assert len(events) == 8 and events[-1].finish_reason == "length"


@pytest.mark.slow
def test_text_to_image_export_generates_images_like_torch(t2i_run, tmp_path):
    out = tmp_path / "t2i-onnx"
    assert main(["export", str(t2i_run), "--format", "onnx", "--out", str(out)]) == 0
    record = json.loads((out / "genforge_export.json").read_text())
    assert record["kind"] == "text-unet" and record["io"]["condition"] == "encoder_hidden_states"
    assert record["parity"]["noise_pred_max_abs_diff"] < PARITY
    assert not list((out / "unet").glob("*.safetensors"))  # the UNet's weights are in model.onnx only
    common = ["--prompt", "a seven", "--num-samples", "2", "--steps", "4", "--seed", "0"]
    assert main(["generate", str(out), *common, "--out", str(tmp_path / "onnx.png")]) == 0
    assert main(["generate", str(t2i_run), *common, "--out", str(tmp_path / "torch.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "onnx.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "torch.png"), dtype=int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_moe_model_folder_exports_with_cache_parity(tmp_path):
    """A Mixtral-style MoE (an HF folder): transformers' grouped_mm experts have no ONNX form, so the
    export switches them to batched_mm; the logits still match over the prompt and the cached steps."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.conftest import tiny_random_llama

    _, tok = tiny_random_llama()
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, eos_token_id=tok.eos_token_id)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    record = export_run(tmp_path / "moe", "onnx", tmp_path / "moe-onnx")
    assert record["model"] == "MixtralForCausalLM"
    assert record["parity"]["logits_max_abs_diff_prompt"] < PARITY
    assert record["parity"]["logits_max_abs_diff_decode"] < PARITY
