"""POST /v1/images/generations for image runs (diffusion, VAE, GAN), OpenAI-compatible.

    {"prompt": "3", "n": 2, "size": "16x16", "response_format": "b64_json",
     "class": 3, "guidance": 3.0, "steps": 10, "seed": 0, "sampler": "ddim"}

`prompt` is a class name when it is one (for a conditional model) and ignored otherwise; `class`
wins over it. `size` must be the model's own (it generates at one size); only `b64_json` is
served (there is no file host for `url`). Errors are OpenAI-style 4xx bodies whether or not the
app around the router installs genforge's handlers, so the router also works on a bare FastAPI.

Limits: one generation runs at a time (concurrent ones would only fight for the cores) and at
most `max_queue` wait behind it (more: 503 with Retry-After); one request may ask for at most
MAX_WORK denoising passes (n x steps); a client that goes away cancels its generation at the
next step, whether it was running or still waiting.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genforge.common.errors import GenforgeError
from genforge.data.image_labels import ImageLabelling
from genforge.models.image_generators import load_image_generator

MAX_N = 64
MAX_WORK = 6400  # n x steps per request: 64 images of 100 steps, or 6 of 1000 DDPM steps
RETRY_AFTER_S = 2
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


def _error(message: str, param: str | None = None, status: int = 400, type_: str = "invalid_request_error",
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": None}}, status_code=status, headers=headers)


class _Cancelled(Exception):
    """The client went away: stop sampling at the next step."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return (f"{param}: unknown field; this endpoint takes prompt, n, size, response_format, "
                f"class, guidance, steps, seed, sampler"), param
    got = repr(first.get("input"))
    return f"{param}: {first['msg']} (got {got[:80]})", param


def _png_b64(image: Any, labelling: ImageLabelling, fields: dict) -> str:
    """A [-1, 1] C x H x W image -> base64 PNG with its AIGC label (and the configured visible label / mark)."""
    from genforge.data.images import to_uint8

    return base64.b64encode(labelling.png(to_uint8(image[None])[0], **fields)).decode("ascii")


class GenerationSlot:
    """One generation at a time (concurrent ones would only fight for the cores), at most `max_queue`
    waiting behind it (more: 503 with Retry-After); a client that goes away cancels its generation at
    the next step, whether it was running or still waiting. Shared by the class and the text routers."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.admitted = 0  # running + waiting; only touched on the event loop

    def acquire(self, cancel: threading.Event) -> None:
        """Wait for the generator in a worker thread; leave as soon as the client does."""
        while not self.lock.acquire(timeout=0.1):
            if cancel.is_set():
                raise _Cancelled
        if cancel.is_set():
            self.lock.release()
            raise _Cancelled

    def release(self) -> None:
        self.lock.release()

    async def run(self, request: Request, work: Callable[[threading.Event], dict]) -> Response:
        """`work(cancel)` in a worker thread under the admission limit; its dict as JSON, a
        GenforgeError as an OpenAI-style error, 499 when the client left first."""
        if self.admitted > self.max_queue:  # one running + max_queue waiting
            return _error(f"the image generator is busy ({self.admitted - 1} requests waiting); retry later",
                          status=503, type_="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1
        cancel = threading.Event()
        job = asyncio.ensure_future(run_in_threadpool(work, cancel))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                cancel.set()  # the worker stops at its next step; its slot frees then
                await asyncio.gather(job, return_exceptions=True)
                return Response(status_code=499)
            return JSONResponse(job.result())
        except GenforgeError as e:
            return JSONResponse(e.to_openai(), status_code=e.status)
        finally:
            self.admitted -= 1
            cancel.set()
            gone.cancel()


def check_size(size: str | None, side: int) -> None:
    """`size` must be the model's own (it generates at one size)."""
    if size is None:
        return
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise GenforgeError(f"size: {size!r} is not 'WxH' (this model makes {side}x{side})", param="size")
    if (int(parts[0]), int(parts[1])) != (side, side):
        raise GenforgeError(f"size: {size} is not available; this model generates {side}x{side} images only",
                            param="size")


def check_response_format(response_format: str | None) -> None:
    if response_format not in (None, "b64_json"):
        raise GenforgeError(f"response_format: {response_format!r} is not supported; use 'b64_json' (this server "
                            f"does not host image files)", param="response_format")


async def json_body(request: Request) -> dict | JSONResponse:
    """The request's JSON object without the OpenAI fields this server ignores, or a 400 response."""
    try:
        body = await request.json()
    except RecursionError:  # on a bare FastAPI; under create_app the gate refuses it earlier
        return _error("request body nests arrays/objects too deeply")
    except ValueError:
        return _error("request body is not valid JSON")
    if not isinstance(body, dict):
        return _error("request body must be a JSON object")
    for key in IGNORED_OPENAI_FIELDS:
        body.pop(key, None)
    return body


def images_router(run_dir: str | Path, *, max_queue: int = 8, max_work: int = MAX_WORK,
                  labelling: ImageLabelling | None = None, model_name: str | None = None) -> APIRouter:
    """A router serving the image run at `run_dir` (loaded now, so a bad run fails at startup): a
    class-conditional or unconditional one here, a text-to-image one by serve/images_text.py.
    Every image returned carries the AIGC label; `labelling` adds the visible label / invisible mark
    (`genforge serve --image-label --image-watermark KEY`)."""
    from genforge.models.text_to_image import is_text_to_image

    labelling = labelling or ImageLabelling()
    if is_text_to_image(run_dir):
        from genforge.serve.images_text import text_images_router

        return text_images_router(run_dir, max_queue=max_queue, max_work=max_work, labelling=labelling,
                                  model_name=model_name)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_image_generator(run_dir, device=device)
    slot = GenerationSlot(max_queue)
    router = APIRouter()
    diffusion = model.family == "diffusion"
    # What the web console shows for this model (GET /v1/features); guidance and steps exist for
    # diffusion only, the one-pass VAE/GAN refuse them.
    router.image_features = {"kind": "class", "family": model.family, "size": model.sample_size,
                             "classes": list(model.class_names) if model.conditional else [],
                             "guidance": diffusion and model.conditional, "steps": diffusion, "edits": False,
                             "max_n": MAX_N}

    def generate(req: ImageGenerationRequest, cancel: threading.Event) -> dict:
        check_response_format(req.response_format)
        check_size(req.size, model.sample_size)
        label = req.class_
        if label is None and req.prompt and model.conditional and req.prompt.strip() in model.class_names:
            label = req.prompt.strip()
        labels = model.labels_for(label, req.n)
        seed = secrets.randbelow(2**31) if req.seed is None else req.seed
        kw: dict = {"guidance": req.guidance, "steps": req.steps, "sampler": req.sampler or "ddim"}
        _, steps = model.check_request(labels=labels, n=req.n, **kw)
        if req.n * steps > max_work:
            raise GenforgeError(f"n: {req.n} images x {steps} steps = {req.n * steps} denoising passes; one "
                                f"request may ask for at most {max_work} (fewer images or fewer steps)", param="n")

        def on_step(i: int, total: int) -> None:
            if cancel.is_set():
                raise _Cancelled

        slot.acquire(cancel)
        try:
            images = model.sample(req.n, labels=labels, seed=seed, on_step=on_step, **kw)
        finally:
            slot.release()
        fields = {"model": model_name or Path(run_dir).name, "run": str(run_dir), "family": model.family,
                  "attributes": {"seed": seed, "class": None if labels is None else str(label)}}
        return {"created": int(time.time()),
                "data": [{"b64_json": _png_b64(im, labelling, fields), "revised_prompt": None} for im in images]}

    @router.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            req = ImageGenerationRequest.model_validate(body)
        except ValidationError as e:
            return _error(*_validation_message(e))
        return await slot.run(request, lambda cancel: generate(req, cancel))

    return router
