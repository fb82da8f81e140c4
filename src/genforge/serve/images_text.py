"""POST /v1/images/generations and /v1/images/edits for a text-to-image (latent-diffusion) run.

    POST /v1/images/generations  (JSON, OpenAI's fields plus vLLM-style extensions)
    {"prompt": "a thick, slanted three", "n": 4, "size": "32x32", "response_format": "b64_json",
     "seed": 0, "negative_prompt": "thin", "guidance_scale": 4.0, "num_inference_steps": 30}

    POST /v1/images/edits  (multipart/form-data, as OpenAI's)
    image=@in.png  [mask=@mask.png]  prompt=...  n  size  response_format  [strength seed negative_prompt
    guidance_scale num_inference_steps]

An edit without a mask is image-to-image (SDEdit; `strength` in (0, 1], default 0.6); with a mask it
is inpainting: white pixels, or a mask's fully transparent pixels (OpenAI's convention), are
regenerated and every other pixel is returned exactly as uploaded (strength default 1.0). The mask
must have the uploaded image's size; an image of another size than the model's is resized to it.
A prompt longer than the text encoder takes is cut to fit (the response's `revised_prompt` shows what
was used) unless the model's genforge.json says text_encoder.long_prompt "refuse" (then 400).
Limits and cancellation as for class runs (serve/images.py: GenerationSlot).
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genforge.common.errors import GenforgeError
from genforge.data.image_labels import ImageLabelling
from genforge.models import text_to_image as t2i
from genforge.serve.images import (
    IGNORED_OPENAI_FIELDS,
    MAX_N,
    GenerationSlot,
    _Cancelled,
    _error,
    check_response_format,
    check_size,
    json_body,
)

log = logging.getLogger("genforge.serve")
FIELDS = "prompt, n, size, response_format, seed, negative_prompt, guidance_scale, num_inference_steps"


class TextImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: str | None = "b64_json"
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(None, ge=0, le=t2i.MAX_GUIDANCE)
    num_inference_steps: int | None = Field(None, ge=1)


class TextImageEditRequest(TextImageRequest):
    strength: float | None = Field(None, gt=0, le=1)


def _validation_message(err: ValidationError, fields: str) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    if first.get("type") == "extra_forbidden":
        return f"{param}: unknown field; this endpoint takes {fields}", param
    if first.get("type") == "missing":
        return f"{param}: required", param
    return f"{param}: {first['msg']} (got {repr(first.get('input'))[:80]})", param


def _png_b64(image: np.ndarray, labelling: ImageLabelling, fields: dict) -> str:
    """uint8 C x H x W -> base64 PNG with its AIGC label (and the configured visible label / mark)."""
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    return base64.b64encode(labelling.png(arr, **fields)).decode("ascii")


def text_images_router(run_dir: str | Path, *, max_queue: int = 8, max_work: int = 6400,
                       labelling: ImageLabelling | None = None, model_name: str | None = None) -> APIRouter:
    """A router serving the text-to-image run at `run_dir` (loaded now, so a bad run fails at startup);
    every image returned carries the AIGC label, plus what `labelling` configures."""
    labelling = labelling or ImageLabelling()
    import torch

    pipe = t2i.load_pipeline(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    long_prompt = t2i.read_meta(run_dir).get("text_encoder", {}).get("long_prompt", "truncate")
    side = t2i.image_size(pipe)
    max_steps = int(pipe.scheduler.config.num_train_timesteps)
    slot = GenerationSlot(max_queue)
    router = APIRouter()
    # What the web console shows for this model (GET /v1/features): prompts, and edits with a mask.
    router.image_features = {"kind": "text", "family": "text-to-image", "size": side, "classes": [],
                             "guidance": True, "steps": True, "max_steps": max_steps, "edits": True,
                             "max_n": MAX_N}

    def prompts(req: TextImageRequest) -> tuple[str, str | None, str | None]:
        """The prompt and negative prompt the encoder will see; the revised prompt when cut."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            used = t2i.check_prompt(pipe, req.prompt, long_prompt=long_prompt)
            negative = None if req.negative_prompt is None else t2i.check_prompt(
                pipe, req.negative_prompt, param="negative_prompt", long_prompt=long_prompt)
        for w in caught:
            log.warning("images: %s", w.message)
        return used, negative, used if used != req.prompt else None

    def run(req: TextImageRequest, cancel: threading.Event, edit: dict | None = None) -> dict:
        check_response_format(req.response_format)
        check_size(req.size, side)
        used, negative, revised = prompts(req)
        steps = req.num_inference_steps or t2i.DEFAULT_STEPS
        if steps > max_steps:
            raise GenforgeError(f"num_inference_steps: {steps} is out of range (1..{max_steps})",
                                param="num_inference_steps")
        kw: dict[str, Any] = {"negative_prompt": negative, "num_samples": req.n, "steps": steps,
                              "guidance": t2i.DEFAULT_GUIDANCE if req.guidance_scale is None else req.guidance_scale,
                              "seed": secrets.randbelow(2**31) if req.seed is None else req.seed}
        strength = None
        if edit is not None:
            mask = edit["mask"]
            strength = req.strength if req.strength is not None else 1.0 if mask is not None else 0.6
            steps = t2i.check_strength(strength, steps)
        if req.n * steps > max_work:
            raise GenforgeError(f"n: {req.n} images x {steps} steps = {req.n * steps} denoising passes; one "
                                f"request may ask for at most {max_work} (fewer images or fewer steps)", param="n")

        def on_step(done: int, total: int) -> None:
            if cancel.is_set():
                raise _Cancelled

        kw["on_step"] = on_step
        slot.acquire(cancel)
        try:
            if edit is None:
                images = t2i.text_to_image(pipe, used, **kw)
            elif edit["mask"] is None:
                images = t2i.image_to_image(pipe, used, edit["image"], strength, **kw)
            else:
                images = t2i.inpaint(pipe, used, edit["image"], edit["mask"], strength=strength, **kw)
        finally:
            slot.release()
        mode = "text-to-image" if edit is None else "image-to-image" if edit["mask"] is None else "inpaint"
        fields = {"model": model_name or Path(run_dir).name, "run": str(run_dir), "family": "latent-diffusion",
                  "attributes": {"mode": mode, "prompt": req.prompt, "seed": kw["seed"]}}
        return {"created": int(time.time()),
                "data": [{"b64_json": _png_b64(im, labelling, fields), "revised_prompt": revised} for im in images]}

    def read_edit(image_bytes: bytes, mask_bytes: bytes | None) -> dict:
        source = t2i.open_image(image_bytes, "image")
        image = t2i.read_image(pipe, source, "image")
        mask = t2i.read_mask(pipe, mask_bytes, source.size) if mask_bytes is not None else None
        return {"image": image, "mask": mask}

    @router.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = TextImageRequest.model_validate(body)
        except ValidationError as e:
            return _error(*_validation_message(e, FIELDS))
        return await slot.run(request, lambda cancel: run(req, cancel))

    @router.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error("/v1/images/edits takes multipart/form-data (image, mask, prompt, ...), as OpenAI's does")
        try:
            form = await request.form()
        except Exception as e:  # starlette's parser: malformed multipart of any kind
            return _error(f"request body is not valid multipart/form-data ({e})")
        files = {key: form.getlist(key) for key in ("image", "image[]", "mask")}
        images = files["image"] + files["image[]"]
        if len(images) != 1 or isinstance(images[0], str):
            return _error(f"image: exactly one image file is required (got {len(images)})", param="image")
        masks = files["mask"]
        if len(masks) > 1 or (masks and isinstance(masks[0], str)):
            return _error("mask: at most one mask file (PNG; white or transparent = regenerate)", param="mask")
        fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask")
                  and k not in IGNORED_OPENAI_FIELDS}
        try:
            req = TextImageEditRequest.model_validate(fields)
        except ValidationError as e:
            return _error(*_validation_message(e, FIELDS + ", strength, and the files image and mask"))
        image_bytes = await images[0].read()
        mask_bytes = await masks[0].read() if masks else None
        return await slot.run(request, lambda cancel: run(req, cancel, read_edit(image_bytes, mask_bytes)))

    return router
