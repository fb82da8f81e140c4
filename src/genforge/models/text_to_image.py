"""Text-to-image, image-to-image (SDEdit) and inpainting from any diffusers StableDiffusionPipeline.

    pipe = load_pipeline("runs/ldm")                              # RUN or RUN/model
    grid = text_to_image(pipe, "a thick, slanted three", num_samples=16, guidance=4, steps=30, seed=0)
    edits = image_to_image(pipe, "a seven", init_image, strength=0.6, num_samples=4, seed=0)
    fixed = inpaint(pipe, "a seven", image, mask, num_samples=4, seed=0)   # mask: True = regenerate

Every function returns uint8 N x C x H x W (the layout of a dataset's images.npy) and takes images
in that layout (one image: C x H x W, or H x W for one channel). The same seed gives the same images.

Inpainting runs the text-to-image (or, with strength < 1, the image-to-image) pipeline and, after
every denoising step, puts back the input's own latents, noised to the next step's level, outside
the mask (the RePaint-style blend that diffusers' StableDiffusionInpaintPipeline does for a 4-channel
UNet; written here as a step callback because that pipeline refuses UNets whose latent has another
channel count and shrinks the mask to the latent grid with nearest-neighbour, which can miss thin
strokes: here a latent cell is regenerated when any of its pixels is masked). The decoded result's
unmasked pixels are then replaced by the input's, so they are kept exactly; the VAE round trip that
this hides is measured by `vae_round_trip_error`.
"""

from __future__ import annotations

import io
import json
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genforge.common.errors import ConfigError, DataError, GenforgeError
from genforge.models.latent_diffusion import FAMILY, META_FILE, load_text_to_image, model_folder

DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 4.0
MAX_GUIDANCE = 20.0
MAX_SAMPLES = 4096
BATCH = 64  # images per pipeline call: bounds memory for large --num-samples
LONG_PROMPT = ("truncate", "refuse")

OnStep = Callable[[int, int], None]


# ---------------------------------------------------------------------------------- the model folder

def read_meta(path: str | Path) -> dict:
    """genforge.json of a run or model folder ({} when there is none or it is unreadable)."""
    meta_path = model_folder(path) / META_FILE
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_text_to_image(path: str | Path) -> bool:
    """True for a latent-diffusion run (or its model/ folder): genforge.json says family latent-diffusion.
    Cheap: reads one small file, imports nothing heavy."""
    return read_meta(path).get("family") == FAMILY


def load_pipeline(path: str | Path, device: str | torch.device = "cpu", unet: Any = None) -> Any:
    """The StableDiffusionPipeline of a latent-diffusion run or model folder (models/latent_diffusion.py
    loads it), in eval mode, without progress bars or the loaders' notes; `unet` replaces the folder's."""
    with _quiet():
        pipe = load_text_to_image(model_folder(path), device=device, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _quiet:
    """diffusers' and transformers' loggers at error level inside the block (their load reports and
    'expected CLIPTextModel' notes are noise for a BERT text encoder)."""

    def __enter__(self) -> None:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self._levels = (dlog.get_verbosity(), tlog.get_verbosity())
        self._bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()

    def __exit__(self, *exc) -> None:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity(self._levels[0])
        tlog.set_verbosity(self._levels[1])
        if self._bars[0]:
            dlog.enable_progress_bar()
        if self._bars[1]:
            tlog.enable_progress_bar()


def image_size(pipe: Any) -> int:
    """The side of the images the pipeline makes (its UNet's latent side x the VAE's downscaling)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def image_channels(pipe: Any) -> int:
    return int(pipe.vae.config.in_channels)


_derived: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _img2img(pipe: Any) -> Any:
    """StableDiffusionImg2ImgPipeline sharing `pipe`'s modules, made once per pipe."""
    if pipe not in _derived:
        from diffusers import StableDiffusionImg2ImgPipeline

        with _quiet():
            derived = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        derived.set_progress_bar_config(disable=True)
        _derived[pipe] = derived
    return _derived[pipe]


# ---------------------------------------------------------------------------------- validation

def check_prompt(pipe: Any, prompt: str, *, param: str = "prompt", long_prompt: str = "truncate") -> str:
    """The prompt the text encoder will see. Longer than its max tokens: cut to fit with a warning
    that says how many tokens were dropped, or refused (`long_prompt="refuse"`). Tokens the encoder's
    vocabulary lacks: a warning with their share (they carry no meaning)."""
    if not isinstance(prompt, str):
        raise GenforgeError(f"{param}: a text prompt is required", param=param)
    if long_prompt not in LONG_PROMPT:
        raise ConfigError(f"long_prompt: {long_prompt!r} is not one of {', '.join(LONG_PROMPT)}")
    tok = pipe.tokenizer
    limit = int(tok.model_max_length)
    ids = tok(prompt, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    unknown = sum(1 for i in ids if unk is not None and i == unk)
    if unknown:
        warnings.warn(f"{param}: {unknown} of {len(ids)} tokens ({unknown / len(ids):.0%}) are unknown to the text "
                      f"encoder and carry no meaning", stacklevel=3)
    if len(ids) <= limit:
        return prompt
    dropped = len(ids) - limit
    if long_prompt == "refuse":
        raise GenforgeError(f"{param}: {len(ids)} tokens, but the text encoder takes at most {limit} "
                            f"(special tokens included); shorten it by {dropped} tokens", param=param)
    enc = tok(prompt, truncation=True, max_length=limit, return_offsets_mapping=True)
    end = max((e for s, e in enc["offset_mapping"] if e > s), default=0)
    warnings.warn(f"{param}: {len(ids)} tokens, the text encoder takes {limit}; the last {dropped} were dropped "
                  f"(kept: {prompt[:end]!r})", stacklevel=3)
    return prompt[:end]


def _check_common(pipe: Any, num_samples: int, guidance: float, steps: int, seed: int,
                  negative_prompt: str | None) -> None:
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise GenforgeError(f"num_samples: {num_samples} is out of range (1..{MAX_SAMPLES})", param="n")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise GenforgeError(f"guidance: {guidance} is out of range (0..{MAX_GUIDANCE:g}; 1 or less turns "
                            f"classifier-free guidance off)", param="guidance")
    max_steps = int(pipe.scheduler.config.num_train_timesteps)
    if not 1 <= steps <= max_steps:
        raise GenforgeError(f"steps: {steps} is out of range (1..{max_steps})", param="steps")
    if seed < 0:
        raise GenforgeError(f"seed: {seed} must be 0 or more", param="seed")
    if negative_prompt and guidance <= 1:
        raise GenforgeError(f"negative_prompt: has no effect without guidance (guidance {guidance} <= 1); "
                            f"raise the guidance or leave the negative prompt out", param="negative_prompt")


def check_strength(strength: float, steps: int) -> int:
    """The denoising steps an edit runs: int(steps x strength), at least one."""
    if not 0 < strength <= 1:
        raise GenforgeError(f"strength: {strength} is out of range (0, 1]: 1 regenerates fully, small values "
                            f"stay close to the input", param="strength")
    if int(steps * strength) < 1:
        raise GenforgeError(f"strength: {strength} x {steps} steps leaves no denoising step; raise the strength "
                            f"or the steps", param="strength")
    return int(steps * strength)


def _as_image(pipe: Any, image: np.ndarray, param: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    c, size = image_channels(pipe), image_size(pipe)
    if arr.dtype != np.uint8 or arr.shape != (c, size, size):
        raise DataError(f"{param}: expected uint8 {c} x {size} x {size} (this model's images), got "
                        f"{arr.dtype} {' x '.join(map(str, arr.shape))}; read files with read_image", param=param)
    return arr


def _as_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != image.shape[1:]:
        raise DataError(f"mask: {' x '.join(map(str, m.shape))} does not match the image's "
                        f"{image.shape[1]} x {image.shape[2]}; give a mask of the image's size", param="mask")
    m = m.astype(bool)
    if not m.any():
        raise DataError("mask: no pixel is marked for regeneration (white = regenerate)", param="mask")
    return m


# ---------------------------------------------------------------------------------- generation

def _to_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 C x H x W -> float 1 x C x H x W in [0, 1] (the pipelines' image processor takes it so)."""
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """The pipelines' output_type="pt" ([0, 1] N x C x H x W) -> uint8."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _sample(pipe: Any, prompt: str, *, negative_prompt: str | None, num_samples: int, guidance: float,
            steps: int, seed: int, on_step: OnStep | None, long_prompt: str, total_steps: int,
            blend: Callable | None = None, **call: Any) -> np.ndarray:
    """Run `pipe` in batches of BATCH images with one seeded generator; `blend(i, t, latents, k)` may
    replace the latents after each step (inpainting)."""
    prompt = check_prompt(pipe, prompt, long_prompt=long_prompt)
    if negative_prompt is not None:
        negative_prompt = check_prompt(pipe, negative_prompt, param="negative_prompt", long_prompt=long_prompt)
    _check_common(pipe, num_samples, guidance, steps, seed, negative_prompt)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    size = image_size(pipe)
    out = []
    for start in range(0, num_samples, BATCH):
        k = min(BATCH, num_samples - start)
        ready = blend(generator, k) if blend is not None else None
        if "image" in call:  # one input image per output: diffusers deprecates broadcasting one
            call["image"] = call["image"][:1].expand(k, -1, -1, -1)
        step_end = _step_end(ready, on_step, start // BATCH * total_steps, -(-num_samples // BATCH) * total_steps)
        with torch.no_grad():
            images = pipe(prompt, negative_prompt=negative_prompt, num_images_per_prompt=k, guidance_scale=guidance,
                          num_inference_steps=steps, height=size, width=size, generator=generator, output_type="pt",
                          callback_on_step_end=step_end, **call).images
        out.append(_to_uint8(images))
    return np.concatenate(out)


def _step_end(blend: Callable | None, on_step: OnStep | None, done_before: int, total: int) -> Callable:
    """The pipelines' callback_on_step_end: the inpainting blend, then progress (and cancellation)."""
    def step_end(pipe: Any, i: int, t: Any, kw: dict) -> dict:
        if blend is not None:
            kw = {"latents": blend(pipe, t, kw["latents"])}
        if on_step is not None:
            on_step(done_before + i + 1, total)
        return kw
    return step_end


def text_to_image(pipe: Any, prompt: str, *, negative_prompt: str | None = None, num_samples: int = 1,
                  guidance: float = DEFAULT_GUIDANCE, steps: int = DEFAULT_STEPS, seed: int = 0,
                  on_step: OnStep | None = None, long_prompt: str = "truncate") -> np.ndarray:
    """`num_samples` images for `prompt`: uint8 N x C x H x W. `on_step(done, total)` after each step
    (raise in it to stop)."""
    return _sample(pipe, prompt, negative_prompt=negative_prompt, num_samples=num_samples, guidance=guidance,
                   steps=steps, seed=seed, on_step=on_step, long_prompt=long_prompt, total_steps=steps)


def image_to_image(pipe: Any, prompt: str, init_image: np.ndarray, strength: float = 0.6, *,
                   negative_prompt: str | None = None, num_samples: int = 1, guidance: float = DEFAULT_GUIDANCE,
                   steps: int = DEFAULT_STEPS, seed: int = 0, on_step: OnStep | None = None,
                   long_prompt: str = "truncate") -> np.ndarray:
    """SDEdit: noise `init_image` to `strength` of the way and denoise it towards `prompt`
    (int(steps x strength) steps; strength 1 keeps almost nothing of the input)."""
    image = _as_image(pipe, init_image, "init_image")
    n_steps = check_strength(strength, steps)
    return _sample(_img2img(pipe), prompt, negative_prompt=negative_prompt, num_samples=num_samples,
                   guidance=guidance, steps=steps, seed=seed, on_step=on_step, long_prompt=long_prompt,
                   total_steps=n_steps, image=_to_unit(image), strength=strength)


def _encode(pipe: Any, image: np.ndarray) -> torch.Tensor:
    """The image's latent (the posterior's mean, scaled as the pipelines scale it): 1 x c x h x w."""
    x = _to_unit(image).to(pipe.device, pipe.vae.dtype) * 2 - 1
    with torch.no_grad():
        return pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor


def inpaint(pipe: Any, prompt: str, image: np.ndarray, mask: np.ndarray, *, strength: float = 1.0,
            negative_prompt: str | None = None, num_samples: int = 1, guidance: float = DEFAULT_GUIDANCE,
            steps: int = DEFAULT_STEPS, seed: int = 0, on_step: OnStep | None = None,
            long_prompt: str = "truncate") -> np.ndarray:
    """Regenerate the masked area (mask True / nonzero) of `image`; every other pixel is the input's,
    exactly. strength < 1 starts the masked area from the noised input instead of pure noise."""
    image = _as_image(pipe, image, "image")
    mask_px = _as_mask(image, mask)
    n_steps = check_strength(strength, steps)
    factor = int(pipe.vae_scale_factor)
    keep_latent = torch.nn.functional.max_pool2d(torch.from_numpy(mask_px).float()[None, None], factor, factor)
    keep_latent = keep_latent.to(pipe.device)  # 1 where any pixel of the latent cell is masked
    known = _encode(pipe, image)

    def blend(generator: torch.Generator, k: int) -> Callable:
        noise = torch.randn((k, *known.shape[1:]), generator=generator).to(known.device, known.dtype)

        def put_back(p: Any, t: Any, latents: torch.Tensor) -> torch.Tensor:
            timesteps = p.scheduler.timesteps
            later = (timesteps == t).nonzero()
            j = int(later[0]) + 1 if len(later) else len(timesteps)
            ref = known.expand(k, -1, -1, -1)
            if j < len(timesteps):  # not the last step: the input as noisy as the latents now are
                ref = p.scheduler.add_noise(ref, noise, timesteps[j:j + 1])
            return (1 - keep_latent) * ref + keep_latent * latents
        return put_back

    if strength >= 1:  # the masked area starts from pure noise, as diffusers' inpainting does at strength 1
        target, call = pipe, {}
    else:
        target, call = _img2img(pipe), {"image": _to_unit(image), "strength": strength}
    out = _sample(target, prompt, negative_prompt=negative_prompt, num_samples=num_samples, guidance=guidance,
                  steps=steps, seed=seed, on_step=on_step, long_prompt=long_prompt, total_steps=n_steps,
                  blend=blend, **call)
    return np.where(mask_px[None, None], out, image[None])


def vae_round_trip_error(pipe: Any, image: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error (0..255) of encode -> decode over the unmasked pixels (all without a mask):
    what inpainting would have changed outside the mask had it not copied the input back."""
    image = _as_image(pipe, image, "image")
    keep = ~_as_mask(image, mask) if mask is not None else np.ones(image.shape[1:], bool)
    with torch.no_grad():
        decoded = pipe.vae.decode(_encode(pipe, image) / pipe.vae.config.scaling_factor).sample
    back = _to_uint8(decoded / 2 + 0.5)[0]
    diff = np.abs(back.astype(np.float64) - image.astype(np.float64))[:, keep]
    return float(diff.mean()) if diff.size else 0.0


# ---------------------------------------------------------------------------------- image files

def open_image(source: str | Path | bytes, param: str = "image") -> Any:
    """A PIL image from a path or uploaded bytes; DataError when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    where = "the upload" if isinstance(source, bytes) else str(source)
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        im.load()
    except FileNotFoundError:
        raise DataError(f"{param}: {where} does not exist", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{param}: {where} is not a readable image ({e}); give a PNG or JPEG", param=param) from None
    return im


def read_image(pipe: Any, source: str | Path | bytes | Any, param: str = "image") -> np.ndarray:
    """uint8 C x H x W in the model's channels and size (resized when the file's size differs)."""
    from PIL import Image

    im = source if isinstance(source, Image.Image) else open_image(source, param)
    size = image_size(pipe)
    im = im.convert("L" if image_channels(pipe) == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def read_mask(pipe: Any, source: str | Path | bytes | Any, image_size_wh: tuple[int, int]) -> np.ndarray:
    """bool H x W at the model's size, True = regenerate: white pixels, or, for a mask with
    transparency, its fully transparent pixels (OpenAI's convention for /v1/images/edits). The file
    must have the image's size (`image_size_wh`, before any resizing)."""
    from PIL import Image

    im = source if isinstance(source, Image.Image) else open_image(source, "mask")
    if im.size != tuple(image_size_wh):
        raise DataError(f"mask: {im.size[0]}x{im.size[1]} does not match the image's "
                        f"{image_size_wh[0]}x{image_size_wh[1]}; give a mask of the image's size", param="mask")
    alpha = im.getchannel("A") if im.mode in ("RGBA", "LA", "PA") else None
    if alpha is not None and alpha.getextrema()[0] < 255:
        marked = np.asarray(alpha) == 0
    else:
        marked = np.asarray(im.convert("L")) >= 128
    size = image_size(pipe)
    if marked.shape != (size, size):
        # BOX: a model pixel is regenerated when any file pixel it covers is marked
        resized = Image.fromarray(marked.astype(np.uint8) * 255).resize((size, size), Image.BOX)
        marked = np.asarray(resized) > 0
    if not marked.any():
        raise DataError("mask: no pixel is marked for regeneration (white, or fully transparent, = regenerate)",
                        param="mask")
    return marked
