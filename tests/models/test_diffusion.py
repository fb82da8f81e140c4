"""Diffusion family: recipe validation, training through the loop, sampling, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from genforge.common.config import from_dict, load_recipe
from genforge.common.errors import ConfigError, GenforgeError
from genforge.data.images import prepare_image_dataset
from genforge.jobs.train import run_recipe
from genforge.models.diffusion import (
    DiffusionModel,
    DiffusionSpec,
    build_scheduler,
    build_unet,
    load_diffusion,
)

TINY_MODEL = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [1],
              "norm_groups": 8, "num_train_timesteps": 100}


def write_recipe(tmp: Path, dataset: Path, name: str = "tiny-diffusion", steps: int = 40, **model) -> Path:
    import yaml

    tree = {"name": name, "family": "diffusion", "dataset": str(dataset), "out_dir": str(tmp / "runs"),
            "model": {**TINY_MODEL, **model},
            "train": {"max_steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0,
                      "ema_decay": 0.9, "eval_every": steps, "eval_batches": 2, "log_every": 5,
                      "checkpoint_every": steps, "seed": 0, "threads": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "digits8"
    prepare_image_dataset("builtin:digits", out, val_fraction=0.2, seed=0)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits8):
    tmp = tmp_path_factory.mktemp("diffusion")
    return run_recipe(write_recipe(tmp, digits8))


def tiny_model(num_classes: int = 3, seed: int = 0) -> DiffusionModel:
    spec = from_dict(DiffusionSpec, TINY_MODEL, "model").resolved(sample_size=8, channels=1, num_classes=num_classes)
    torch.manual_seed(seed)
    return DiffusionModel(build_unet(spec), build_scheduler(spec), [f"c{i}" for i in range(num_classes)])


def test_training_loss_falls_and_exports_a_diffusers_layout(trained):
    rows = [r for r in trained.run.read_metrics() if "loss" in r]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    model_dir = trained.run.model_dir
    # the folder loads with plain diffusers, as a pipeline and as parts
    pipe = DDPMPipeline.from_pretrained(model_dir)
    assert isinstance(pipe.unet, UNet2DModel) and pipe.unet.config.num_class_embeds == 11
    assert isinstance(DDPMScheduler.from_pretrained(model_dir / "scheduler"), DDPMScheduler)
    assert UNet2DModel.from_pretrained(model_dir / "unet").config.sample_size == 8
    assert "## Training" in trained.run.report_path.read_text()


def test_save_load_gives_identical_samples(trained, tmp_path):
    model = load_diffusion(trained.run.path)
    assert model.class_names == [str(i) for i in range(10)] and model.null_class == 10
    a = model.sample(4, labels=[0, 1, 2, 3], guidance=2.0, steps=5, seed=11)
    model.save(tmp_path / "copy")
    b = load_diffusion(tmp_path / "copy").sample(4, labels=[0, 1, 2, 3], guidance=2.0, steps=5, seed=11)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_shapes_and_determinism(sampler):
    model = tiny_model()
    kw = {"labels": [0, 1, 2, 0, 1], "guidance": 3.0, "steps": 6, "sampler": sampler}
    a = model.sample(5, seed=1, **kw)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, model.sample(5, seed=1, **kw))
    assert not torch.allclose(a, model.sample(5, seed=2, **kw))
    # sample i depends on (seed, i) only: a smaller request or other batching gives the same images
    b = model.sample(3, seed=1, **{**kw, "labels": kw["labels"][:3]}, batch_size=2)
    assert torch.allclose(a[:3], b, atol=1e-4)
    assert model.sample(2, seed=0, steps=3, sampler=sampler).shape == (2, 1, 8, 8)  # unconditional


def test_ddim_and_ddpm_differ_and_step_counts_default():
    model = tiny_model()
    assert model.check_request(labels=None, guidance=None, steps=None, sampler="ddim") == (1.0, 50)
    assert model.check_request(labels=None, guidance=None, steps=None, sampler="ddpm") == (1.0, 100)
    a = model.sample(2, labels=[0, 1], steps=5, sampler="ddim", seed=0)
    b = model.sample(2, labels=[0, 1], steps=5, sampler="ddpm", seed=0)
    assert not torch.allclose(a, b)


def test_guidance_changes_samples(trained):
    model = load_diffusion(trained.run.path)
    kw = {"labels": [3, 3], "steps": 5, "seed": 4}
    plain, guided = model.sample(2, guidance=1.0, **kw), model.sample(2, guidance=4.0, **kw)
    assert (plain - guided).abs().mean() > 1e-3


@pytest.mark.parametrize("kw, match", [
    ({"guidance": -1.0}, "guidance: -1.0 is out of range"),
    ({"guidance": 25.0}, "out of range"),
    ({"steps": 0}, "steps: 0 is out of range"),
    ({"steps": 101}, r"out of range \(1..100\)"),
    ({"sampler": "euler"}, "not one of ddim, ddpm"),
    ({"labels": [7, 0]}, "class: 7 is out of range"),
])
def test_bad_sampling_requests(kw, match):
    model = tiny_model()
    args = {"labels": [0, 1], **kw}
    with pytest.raises(GenforgeError, match=match):
        model.sample(2, **args)


def test_unconditional_model_rejects_class_and_guidance():
    model = tiny_model(num_classes=0)
    assert not model.conditional and model.sample(1, steps=2).shape == (1, 1, 8, 8)
    with pytest.raises(GenforgeError, match="unconditional"):
        model.sample(1, labels=[0], steps=2)
    with pytest.raises(GenforgeError, match="unconditional"):
        model.sample(1, guidance=3.0, steps=2)
    with pytest.raises(GenforgeError, match="unconditional"):
        model.resolve_class("3")


def test_class_names_resolve():
    model = tiny_model()
    assert model.resolve_class("c2") == 2 and model.resolve_class(1) == 1 and model.resolve_class(None) is None
    with pytest.raises(GenforgeError, match="unknown class 'cat'.*c0, c1, c2"):
        model.resolve_class("cat")


@pytest.mark.parametrize("model, match", [
    ({"block_out_chanels": [16]}, "unknown key 'model.block_out_chanels' .did you mean 'block_out_channels'"),
    ({"attention_levels": [3]}, "level 3 does not exist"),
    ({"block_out_channels": [12, 24]}, "multiple of model.norm_groups"),
    ({"sample_size": 10, "block_out_channels": [8, 16, 16]}, "divisible by 4"),
    ({"beta_schedule": "cosine"}, "not one of linear"),
    ({"prediction_type": "flow"}, "not one of epsilon"),
    ({"cond_dropout": 1.5}, "must be <= 1"),
    ({"num_train_timesteps": 1}, "must be >= 2"),
])
def test_recipe_model_section_is_validated(model, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DiffusionSpec, model, "model")


def test_recipe_file_loads(tmp_path, digits8):
    recipe = load_recipe(write_recipe(tmp_path, digits8))
    assert recipe.family == "diffusion"
    with pytest.raises(ConfigError, match="model.layer_per_block"):
        run_recipe(write_recipe(tmp_path, digits8, name="bad", layer_per_block=1))
