"""VAE, VAE-LoRA and GAN families through the one loop, on 8x8 digits: loss falls, runs save and load,
resume is exact, and recipe mistakes are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from genforge.common.config import recipe_from_tree
from genforge.common.errors import ConfigError
from genforge.data.images import prepare_image_dataset
from genforge.jobs.train import run_loaded_recipe
from genforge.models.gan import load_generator
from genforge.models.vae import load_vae

TRAIN = {"batch_size": 64, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0, "eval_every": 10,
         "eval_batches": 2, "log_every": 5, "checkpoint_every": 10, "keep_last": 1, "seed": 0, "threads": 1}
VAE_MODEL = {"latent_dim": 8, "block_out_channels": [16, 32]}
GAN_MODEL = {"latent_dim": 16, "g_channels": 16, "d_channels": 16}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits8"
    prepare_image_dataset("builtin:digits", out)
    return out


def _recipe(name: str, family: str, dataset: Path, out: Path, steps: int, model: dict, **extra):
    tree = {"name": name, "family": family, "dataset": str(dataset), "out_dir": str(out), "model": model,
            "train": {**TRAIN, "max_steps": steps, **extra.pop("train", {})}, **extra}
    return recipe_from_tree(tree)


def _train_losses(run, key: str = "loss") -> list[float]:
    return [r[key] for r in run.read_metrics() if key in r]


@pytest.fixture(scope="module")
def vae_run(digits: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run_loaded_recipe(_recipe("vae", "vae", digits, out, 40, VAE_MODEL, data={"exclude_classes": ["0"]}))


def test_vae_trains_and_saves(vae_run):
    run = vae_run.run
    losses = _train_losses(run)
    assert losses[-1] < 0.6 * losses[0], losses
    val = [r["val_loss"] for r in run.read_metrics() if "val_loss" in r]
    assert val[-1] < val[0]
    assert {"val_recon", "val_kl", "val_nelbo"} <= set(vae_run.result.final_val)
    vae, meta = load_vae(run.path)
    assert meta["family"] == "vae" and meta["exclude_classes"] == ["0"] and meta["sample_size"] == 8
    assert torch.equal(vae.sample(4, seed=0), load_vae(run.model_dir)[0].sample(4, seed=0))
    assert (run.plots_dir / "loss.png").is_file() and "Training" in run.report_path.read_text()


def test_vae_resume_is_exact(digits: Path, tmp_path: Path):
    straight = run_loaded_recipe(_recipe("a", "vae", digits, tmp_path, 20, VAE_MODEL,
                                         data={"augment": {"crop_prob": 0.5}}))
    stop = {"time_budget": 0.000001}  # stops after the first step
    run_loaded_recipe(_recipe("b", "vae", digits, tmp_path, 20, VAE_MODEL, data={"augment": {"crop_prob": 0.5}},
                              train=stop))
    r = _recipe("b", "vae", digits, tmp_path, 20, VAE_MODEL, data={"augment": {"crop_prob": 0.5}})
    resumed = run_loaded_recipe(r, resume=True)
    a, b = load_vae(straight.run.path)[0], load_vae(resumed.run.path)[0]
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n


def test_vae_lora_trains_only_the_adapter(vae_run, digits: Path, tmp_path: Path):
    base_dir = vae_run.run.path
    base_before = (base_dir / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    r = _recipe("lora", "vae", digits, tmp_path, 20, {"beta": 1.0},
                lora={"base": str(base_dir), "r": 4, "alpha": 8})
    out = run_loaded_recipe(r)
    run = out.run
    adapter = run.adapters_dir / "lora"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and all(t.startswith("decoder.") for t in cfg["target_modules"])
    assert (base_dir / "model" / "diffusion_pytorch_model.safetensors").read_bytes() == base_before
    base = load_vae(base_dir)[0]
    merged, meta = load_vae(run.path)
    assert meta["lora"]["base"] == str(base_dir)
    # the encoder is untouched; the decoder moved by exactly the adapter
    for k, v in base.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(v, merged.state_dict()[k]), k
    assert not torch.equal(base.sample(4, seed=0), merged.sample(4, seed=0))
    with_adapter = PeftModel.from_pretrained(load_vae(base_dir)[0], adapter).eval()
    z = torch.randn(4, base.config.latent_dim, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(with_adapter.decode(z), merged.decode(z), atol=1e-5)
    assert "trainable (LoRA)" in run.report_path.read_text()


def test_vae_lora_recipe_errors(vae_run, digits: Path, tmp_path: Path):
    base = str(vae_run.run.path)
    with pytest.raises(ConfigError, match="model.latent_dim: 32 differs"):
        run_loaded_recipe(_recipe("x", "vae", digits, tmp_path, 5, {"latent_dim": 32}, lora={"base": base}))
    with pytest.raises(ConfigError, match="lora.base"):
        run_loaded_recipe(_recipe("x", "vae", digits, tmp_path, 5, {}, lora={"base": str(tmp_path / "none")}))
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        run_loaded_recipe(_recipe("x", "vae", digits, tmp_path, 5, {}, lora={"base": base, "rank": 4}))
    with pytest.raises(ConfigError, match="unknown key 'model.latent'"):
        run_loaded_recipe(_recipe("x", "vae", digits, tmp_path, 5, {"latent": 4}))


def test_dcgan_trains_and_saves(digits: Path, tmp_path: Path):
    out = run_loaded_recipe(_recipe("dc", "gan", digits, tmp_path, 40, {**GAN_MODEL, "loss": "dcgan"},
                                    train={"lr": 1e-3, "grad_clip": None, "warmup_steps": 0}))
    val = [r["val_loss"] for r in out.run.read_metrics() if "val_loss" in r]
    assert val[-1] < 0.5 * val[0], val  # MMD^2 of fixed-noise samples to the val digits
    rows = out.run.read_metrics()
    assert all({"loss_g", "loss_d"} <= set(r) for r in rows if "lr" in r)
    g, meta = load_generator(out.run.path)
    assert meta["conditional"] and meta["loss"] == "dcgan"
    assert torch.equal(g.sample(10, seed=1), load_generator(out.run.model_dir)[0].sample(10, seed=1))
    assert (out.run.model_dir / "discriminator" / "config.json").is_file()


def test_wgan_gp_trains(digits: Path, tmp_path: Path):
    out = run_loaded_recipe(_recipe("wg", "gan", digits, tmp_path, 20,
                                    {**GAN_MODEL, "loss": "wgan-gp", "n_critic": 2, "conditional": False},
                                    train={"lr": 1e-3, "grad_clip": None, "warmup_steps": 0, "eval_every": 5}))
    rows = out.run.read_metrics()
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0], val
    assert all("gp" in r and "w_dist" in r for r in rows if "lr" in r)
    assert not load_generator(out.run.path)[1]["conditional"]


def test_gan_recipe_errors(digits: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="grad_accum"):
        run_loaded_recipe(_recipe("x", "gan", digits, tmp_path, 5, {}, train={"grad_accum": 2}))
    with pytest.raises(ConfigError, match="lora"):
        run_loaded_recipe(_recipe("x", "gan", digits, tmp_path, 5, {}, lora={"base": "x"}))
    with pytest.raises(ConfigError, match="unknown key 'data.exclude'"):
        run_loaded_recipe(_recipe("x", "gan", digits, tmp_path, 5, {}, data={"exclude": ["1"]}))


def test_gan_resume_is_exact(digits: Path, tmp_path: Path):
    model = {**GAN_MODEL, "loss": "wgan-gp", "n_critic": 2}
    straight = run_loaded_recipe(_recipe("a", "gan", digits, tmp_path, 8, model, train={"checkpoint_every": 4}))
    run_loaded_recipe(_recipe("b", "gan", digits, tmp_path, 8, model,
                              train={"checkpoint_every": 4, "time_budget": 0.000001}))  # stops after step 1
    r = _recipe("b", "gan", digits, tmp_path, 8, model, train={"checkpoint_every": 4})
    resumed = run_loaded_recipe(r, resume=True)
    a, b = load_generator(straight.run.path)[0], load_generator(resumed.run.path)[0]
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
