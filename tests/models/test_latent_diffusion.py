"""Contract 2: the parts a latent-diffusion recipe builds save as a StableDiffusionPipeline folder that
diffusers loads with no extra arguments and that generates; load_text_to_image refuses other folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from genforge.common.config import from_dict
from genforge.common.errors import ConfigError
from genforge.models.latent_diffusion import (
    AutoencoderSpec,
    LatentDiffusionSpec,
    build_autoencoder,
    build_scheduler,
    build_unet,
    load_text_encoder,
    load_text_to_image,
    make_pipeline,
    save_pipeline,
)

SPEC = {"max_tokens": 16, "block_out_channels": [16, 32], "norm_groups": 8, "attention_head_dim": 8}
VAE = {"block_out_channels": [8, 16, 16], "norm_groups": 8}


def _pipeline(text_encoder: str | None = None):
    spec = from_dict(LatentDiffusionSpec, SPEC, "model")
    encoder, tokenizer = load_text_encoder(text_encoder, spec.max_tokens)
    torch.manual_seed(0)
    vae = build_autoencoder(from_dict(AutoencoderSpec, VAE, "model.vae"), channels=1, sample_size=16)
    unet = build_unet(spec, latent_channels=4, latent_size=4, cross_attention_dim=encoder.config.hidden_size)
    return make_pipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(spec))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ldm") / "model"
    save_pipeline(_pipeline(), folder, {"image_size": 16, "channels": 1, "classes": ["0", "1"]})
    return folder


def test_stable_diffusion_pipeline_loads_the_folder_and_generates(saved: Path):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"] and index["safety_checker"] == [None, None]
    assert json.loads((saved / "genforge.json").read_text())["family"] == "latent-diffusion"
    pipe = StableDiffusionPipeline.from_pretrained(saved)
    assert pipe.tokenizer.model_max_length == 16 and pipe.vae_scale_factor == 4
    assert pipe.text_encoder.config.use_attention_mask  # padding never changes a caption's states
    kwargs = {"num_inference_steps": 2, "generator": torch.Generator().manual_seed(0)}
    images = pipe("a handwritten three", output_type="np", **kwargs).images
    assert images.shape == (1, 16, 16, 1) and np.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    kwargs["generator"] = torch.Generator().manual_seed(0)
    pil = pipe("a handwritten three", output_type="pil", **kwargs).images[0]
    assert pil.mode == "L" and pil.size == (16, 16)
    assert np.array_equal(np.asarray(pil), (images[0, :, :, 0] * 255).round().astype(np.uint8))


def test_padding_does_not_change_a_captions_states(saved: Path):
    pipe = load_text_to_image(saved)
    short = pipe.encode_prompt(["a seven"], "cpu", 1, False)[0]
    pipe.tokenizer.model_max_length = 24
    longer = pipe.encode_prompt(["a seven"], "cpu", 1, False)[0]
    n = len(pipe.tokenizer("a seven").input_ids)
    assert torch.allclose(short[0, :n], longer[0, :n], atol=1e-5)


def test_load_text_to_image_from_a_run_and_refusals(saved: Path, tmp_path: Path):
    pipe = load_text_to_image(saved.parent)  # the run directory holding model/
    assert not pipe.unet.training and pipe.device.type == "cpu"
    with pytest.raises(ConfigError, match="not a text-to-image model"):
        load_text_to_image(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(ConfigError, match="not a StableDiffusionPipeline"):
        load_text_to_image(tmp_path)


def test_a_clip_text_encoder_folder_works_too(tmp_path: Path):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from genforge.models.latent_diffusion import default_text_encoder_path

    folder = tmp_path / "clip"
    CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_text_encoder_path()).save_pretrained(folder)
    pipe = _pipeline(str(folder))
    pipe.save_pretrained(tmp_path / "model")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert type(loaded.text_encoder).__name__ == "CLIPTextModel" and loaded.unet.config.cross_attention_dim == 32
    out = loaded("a three", num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("spec, message", [
    ({"block_out_channels": [12]}, r"model.block_out_channels\[0\]"),
    ({"beta_schedule": "cosine"}, "model.beta_schedule"),
    ({"vae": ""}, "model.vae: an empty path"),
])
def test_bad_spec_values(spec: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        from_dict(LatentDiffusionSpec, spec, "model")


def test_unknown_text_encoder_kinds_are_refused(tmp_path: Path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="'gpt2' model"):
        load_text_encoder(tmp_path / "gpt2", 16)
