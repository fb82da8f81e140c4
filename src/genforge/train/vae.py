"""The VAE family: loss = reconstruction NLL + beta * KL, optionally a LoRA on a trained VAE's decoder.

`recipe.lora` (r, alpha, dropout, base, target) loads the VAE of the run `base`, freezes it and
trains only LoRA matrices on its decoder (peft). Export writes the merged model to model/ (loads
with plain `ConvVAE.from_pretrained`) and the adapter in peft format to adapters/<name>/
(`PeftModel.from_pretrained(base_vae, that_folder)`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from pydantic import Field

from genforge.common.config import Recipe, Spec, TrainConfig, from_dict, rng
from genforge.common.errors import ConfigError, RunError
from genforge.common.runs import RunDir, atomic_dir
from genforge.data.images import ImageBatches, ImageDataset, load_image_data
from genforge.models.vae import (
    LIKELIHOODS,
    ConvVAE,
    decoder_lora_targets,
    load_vae,
    per_image_losses,
    resolve_model_dir,
    save_meta,
)
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw

_ARCH = ("latent_dim", "block_out_channels", "norm_groups", "likelihood")


class VAESpec(Spec):
    """The recipe's `model:` section for family vae."""

    latent_dim: int = rng(16, min=1, max=1024)
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64])
    norm_groups: int = rng(8, min=1)
    likelihood: str = rng("gaussian", choices=list(LIKELIHOODS))
    beta: float = rng(1.0, min=0, help="weight of the KL term (beta-VAE); 1 = the ELBO")


class LoraSpec(Spec):
    """The recipe's `lora:` section (VAE): a decoder LoRA on a trained VAE run."""

    base: str = rng(help="run directory (or model folder) of the trained VAE to adapt")
    r: int = rng(8, min=1, max=256)
    alpha: float = rng(16.0, min=0, min_exclusive=True)
    dropout: float = rng(0.0, min=0, max=0.9)
    target: str = rng("decoder", choices=["decoder"])
    name: str | None = None  # adapters/<name>/; default: the recipe's name


class VAEObjective(SingleLoss):
    def __init__(self, model: torch.nn.Module, beta: float, dataset: ImageDataset, exclude: list[str],
                 device: torch.device, run: RunDir, lora: LoraSpec | None = None, name: str = "vae"):
        self.model, self.beta, self.dataset, self.exclude = model, beta, dataset, exclude
        self.device, self.run, self.lora, self.name = device, run, lora, name
        self.modules = {"vae": model}

    @property
    def base(self) -> ConvVAE:
        return getattr(self.model, "get_base_model", lambda: self.model)()

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        return [OptimizerSpec(adamw([p for p in self.model.parameters() if p.requires_grad], cfg,
                                    device=self.device))]

    def _terms(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        recon, kl = per_image_losses(self.model, batch["images"], generator)
        return recon.mean(), kl.mean()

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        recon, kl = self._terms(batch)
        loss = recon + self.beta * kl
        return loss, {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    def eval_step(self, batch: dict) -> dict[str, float]:
        # a fixed posterior sample per batch, so the same weights always give the same val loss
        g = torch.Generator(device=self.device).manual_seed(0)
        recon, kl = self._terms(batch, g)
        return {"loss": float(recon + self.beta * kl), "recon": float(recon), "kl": float(kl),
                "nelbo": float(recon + kl)}

    def signature(self) -> dict:
        sig = {k: v for k, v in self.base.config.items() if not k.startswith("_")}
        return {**sig, "beta": self.beta, "lora": None if self.lora is None else
                {"r": self.lora.r, "alpha": self.lora.alpha, "target": self.lora.target}}

    def meta(self) -> dict:
        return {"family": "vae", "classes": self.dataset.classes, "sample_size": self.base.config.sample_size,
                "channels": self.base.config.channels, "likelihood": self.base.config.likelihood,
                "beta": self.beta, "exclude_classes": self.exclude,
                "dataset": {"path": str(self.dataset.path.resolve()), "content_hash": self.dataset.content_hash},
                "lora": None if self.lora is None else {"base": self.lora.base, "adapter": str(self.adapter_dir)}}

    @property
    def adapter_dir(self) -> Path:
        return self.run.adapters_dir / (self.lora.name if self.lora and self.lora.name else self.name)

    def export(self, model_dir: Path) -> None:
        model = self.model
        if self.lora is not None:
            with atomic_dir(self.adapter_dir) as tmp:
                model.save_pretrained(tmp)
            model = copy.deepcopy(model).merge_and_unload()  # plain ConvVAE, LoRA folded into the weights
        model.save_pretrained(model_dir)
        save_meta(model_dir, self.meta())

    def describe(self) -> dict:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        out = {"parameters": total, "architecture": f"ConvVAE latent {self.base.config.latent_dim}, "
               f"{self.base.config.likelihood} likelihood, beta {self.beta:g}"}
        if self.lora is not None:
            out["trainable (LoRA)"] = trainable
            out["adapter"] = str(self.adapter_dir)
        return out


def _with_lora(spec: VAESpec, given: dict, lora: LoraSpec, sample_size: int, channels: int,
               device: torch.device) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    try:
        base, _meta = load_vae(lora.base, device)
    except RunError as e:
        raise ConfigError(f"lora.base: {e.message}") from None
    for key in _ARCH:
        if key in given and list(_as_list(given[key])) != list(_as_list(base.config[key])):
            raise ConfigError(f"model.{key}: {given[key]!r} differs from the base VAE's "
                              f"{base.config[key]!r}; a LoRA keeps the base architecture, drop the key")
    if (base.config.sample_size, base.config.channels) != (sample_size, channels):
        raise ConfigError(f"lora.base: the base VAE takes {base.config.channels}x{base.config.sample_size}px "
                          f"images, the dataset has {channels}x{sample_size}px")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=decoder_lora_targets(base), init_lora_weights=True)
    model = get_peft_model(base, config)  # freezes every non-LoRA parameter
    # recorded in adapter_config.json so the adapter names the VAE it was trained on
    model.peft_config["default"].base_model_name_or_path = str(resolve_model_dir(lora.base).resolve())
    return model


def _as_list(v):
    return v if isinstance(v, (list, tuple)) else [v]


def build(recipe: Recipe, device: torch.device) -> tuple[VAEObjective, ImageBatches]:
    spec = from_dict(VAESpec, recipe.model, "model")
    lora = from_dict(LoraSpec, recipe.lora, "lora") if recipe.lora is not None else None
    cfg = recipe.train
    dataset, data, data_cfg = load_image_data(recipe.dataset, recipe.data, cfg.batch_size, cfg.seed)
    if not isinstance(dataset.size, int):
        raise ConfigError(f"dataset {recipe.dataset}: images are {dataset.size}, the VAE needs square ones "
                          "(prepare with --size N)")
    torch.manual_seed(cfg.seed)
    if lora is not None:
        model = _with_lora(spec, recipe.model, lora, dataset.size, dataset.channels, device)
    else:
        model = ConvVAE(sample_size=dataset.size, channels=dataset.channels, latent_dim=spec.latent_dim,
                        block_out_channels=list(spec.block_out_channels), norm_groups=spec.norm_groups,
                        likelihood=spec.likelihood)
    model = model.to(device)
    exclude = [dataset.classes[dataset.class_index(c)] for c in data_cfg.exclude_classes]
    return VAEObjective(model, spec.beta, dataset, exclude, device, RunDir(recipe.run_dir), lora,
                        recipe.name), data
