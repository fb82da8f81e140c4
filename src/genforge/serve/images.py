"""POST /v1/images/generations for image runs (diffusion, VAE, GAN), OpenAI-compatible.

    {"prompt": "3", "n": 2, "size": "16x16", "response_format": "b64_json",
     "class": 3, "guidance": 3.0, "steps": 10, "seed": 0, "sampler": "ddim"}

`prompt` is a class name when it is one (for a conditional model) and ignored otherwise; `class`
wins over it. `size` must be the model's own (it generates at one size); only `b64_json` is
served (there is no file host for `url`). Errors are OpenAI-style 4xx bodies whether or not the
app around the router installs genforge's handlers, so the router also works on a bare FastAPI.
"""

from __future__ import annotations

import base64
import io
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genforge.common.errors import GenforgeError
from genforge.models.diffusion import load_image_generator

MAX_N = 64
IGNORED_OPENAI_FIELDS = ("user", "quality", "style", "background", "moderation", "output_format",
                         "output_compression")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = None
    prompt: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: str | None = "b64_json"
    class_: int | str | None = Field(None, alias="class")
    guidance: float | None = None
    steps: int | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    sampler: Literal["ddim", "ddpm"] | None = None


def _error(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return (f"{param}: unknown field; this endpoint takes prompt, n, size, response_format, "
                f"class, guidance, steps, seed, sampler"), param
    got = repr(first.get("input"))
    return f"{param}: {first['msg']} (got {got[:80]})", param


def _png_b64(image: Any) -> str:
    from PIL import Image

    from genforge.data.images import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def images_router(run_dir: str | Path) -> APIRouter:
    """A router serving the image run at `run_dir` (loaded now, so a bad run fails at startup)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_image_generator(run_dir, device=device)
    lock = threading.Lock()  # one generation at a time: concurrent ones would only fight for cores
    router = APIRouter()

    def generate(req: ImageGenerationRequest) -> dict:
        if req.response_format not in (None, "b64_json"):
            raise GenforgeError(f"response_format: {req.response_format!r} is not supported; use "
                                f"'b64_json' (this server does not host image files)", param="response_format")
        side = model.sample_size
        if req.size is not None:
            parts = req.size.lower().split("x")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise GenforgeError(f"size: {req.size!r} is not 'WxH' (this model makes {side}x{side})",
                                    param="size")
            if (int(parts[0]), int(parts[1])) != (side, side):
                raise GenforgeError(f"size: {req.size} is not available; this model generates "
                                    f"{side}x{side} images only", param="size")
        label = req.class_
        if label is None and req.prompt and model.conditional and req.prompt.strip() in model.class_names:
            label = req.prompt.strip()
        labels = model.labels_for(label, req.n)
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        kw: dict = {"guidance": req.guidance, "steps": req.steps, "sampler": req.sampler or "ddim"}
        model.check_request(labels=labels, n=req.n, **kw)
        with lock:
            images = model.sample(req.n, labels=labels, seed=seed, **kw)
        return {"created": int(time.time()),
                "data": [{"b64_json": _png_b64(im), "revised_prompt": None} for im in images]}

    @router.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error("request body is not valid JSON")
        if not isinstance(body, dict):
            return _error("request body must be a JSON object")
        for key in IGNORED_OPENAI_FIELDS:
            body.pop(key, None)
        try:
            req = ImageGenerationRequest.model_validate(body)
        except ValidationError as e:
            return _error(*_validation_message(e))
        try:
            return JSONResponse(await run_in_threadpool(generate, req))
        except GenforgeError as e:
            return JSONResponse(e.to_openai(), status_code=e.status)

    return router
