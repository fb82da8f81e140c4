"""The VAE and GAN modules: shapes for every supported geometry, save/load, LoRA targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from genforge.common.config import from_dict
from genforge.common.errors import ConfigError, RunError
from genforge.models.gan import Discriminator, Generator, load_generator
from genforge.models.vae import ConvVAE, decoder_lora_targets, load_vae, per_image_losses, save_meta
from genforge.train.gan import GANSpec, mmd2


@pytest.mark.parametrize("size,channels,blocks", [(8, 1, [16, 32]), (16, 3, [16, 32, 32]), (32, 1, [8, 16])])
def test_vae_geometries(size: int, channels: int, blocks: list[int]):
    torch.manual_seed(0)
    vae = ConvVAE(sample_size=size, channels=channels, latent_dim=4, block_out_channels=blocks)
    x = torch.rand(3, channels, size, size) * 2 - 1
    recon, kl = per_image_losses(vae, x)
    assert recon.shape == kl.shape == (3,) and (kl >= 0).all()
    out = vae.sample(2, seed=0)
    assert out.shape == (2, channels, size, size) and out.abs().max() <= 1


def test_vae_rejects_bad_geometry():
    with pytest.raises(ConfigError, match="power of two"):
        ConvVAE(sample_size=12)
    with pytest.raises(ConfigError, match="channels"):
        ConvVAE(channels=2)
    with pytest.raises(ConfigError, match="at most 3 levels"):
        ConvVAE(sample_size=8, block_out_channels=[8, 8, 8, 8])
    with pytest.raises(ConfigError, match="likelihood"):
        ConvVAE(likelihood="poisson")


def test_vae_save_load_gives_identical_samples(tmp_path: Path):
    torch.manual_seed(1)
    vae = ConvVAE(sample_size=8, latent_dim=4, block_out_channels=[8, 16], likelihood="bernoulli").eval()
    vae.save_pretrained(tmp_path / "model")
    save_meta(tmp_path / "model", {"family": "vae", "classes": ["a"]})
    loaded, meta = load_vae(tmp_path)  # a run dir finds its model/
    assert meta["classes"] == ["a"] and loaded.config.likelihood == "bernoulli"
    assert torch.equal(vae.sample(5, seed=3), loaded.sample(5, seed=3))
    assert not torch.equal(loaded.sample(5, seed=3), loaded.sample(5, seed=4))
    with pytest.raises(RunError, match="not a VAE"):
        save_meta(tmp_path / "model", {"family": "gan"})
        load_vae(tmp_path / "model")


def test_decoder_lora_targets_train_only_adapters():
    vae = ConvVAE(sample_size=16, latent_dim=4, block_out_channels=[8, 16])
    targets = decoder_lora_targets(vae)
    assert targets == ["decoder.fc", "decoder.blocks.0.conv", "decoder.blocks.1.conv", "decoder.conv_out"]
    peft_vae = get_peft_model(vae, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    trainable = [n for n, p in peft_vae.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".decoder." in n for n in trainable)
    recon, kl = per_image_losses(peft_vae, torch.zeros(2, 1, 16, 16))
    (recon + kl).sum().backward()
    assert all(p.grad is None for n, p in peft_vae.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("size,channels,classes,norm", [(8, 1, 0, "batch"), (16, 1, 10, "layer"),
                                                        (32, 3, 3, "none")])
def test_gan_geometries(size: int, channels: int, classes: int, norm: str):
    g = Generator(sample_size=size, channels=channels, latent_dim=8, base_channels=8, num_classes=classes)
    d = Discriminator(sample_size=size, channels=channels, base_channels=8, norm=norm, num_classes=classes)
    x = g.eval().sample(4, seed=0)
    assert x.shape == (4, channels, size, size) and x.abs().max() <= 1
    labels = torch.arange(4) % classes if classes else None
    assert d(x, labels).shape == (4,)
    with pytest.raises(ConfigError, match="too small"):
        Generator(sample_size=4)


def test_generator_save_load_and_class_labels(tmp_path: Path):
    torch.manual_seed(0)
    g = Generator(sample_size=8, latent_dim=8, base_channels=8, num_classes=3).eval()
    g.save_pretrained(tmp_path / "model" / "generator")
    save_meta(tmp_path / "model", {"family": "gan", "classes": ["x", "y", "z"]})
    loaded, meta = load_generator(tmp_path)
    assert torch.equal(g.sample(6, seed=2), loaded.sample(6, seed=2))
    # the label changes the image for the same noise
    assert not torch.equal(loaded.sample(2, seed=2, labels=torch.tensor(0)),
                           loaded.sample(2, seed=2, labels=torch.tensor(1)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="no GAN generator"):
        load_generator(tmp_path / "empty")


def test_gan_spec_validation():
    with pytest.raises(ConfigError, match="batch norm breaks"):
        from_dict(GANSpec, {"loss": "wgan-gp", "norm": "batch"}, "model")
    with pytest.raises(ConfigError, match="did you mean 'loss'"):
        from_dict(GANSpec, {"los": "dcgan"}, "model")
    with pytest.raises(ConfigError, match="not one of"):
        from_dict(GANSpec, {"loss": "lsgan"}, "model")


def test_mmd_is_lower_for_the_same_distribution():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    far = torch.randn(64, 16, generator=g) + 2
    assert mmd2(a, b) < mmd2(far, b)
