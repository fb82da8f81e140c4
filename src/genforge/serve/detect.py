"""`POST /v1/detect`: is this text watermarked by this server's key (or a given one)? Does this
image carry the AIGC metadata label and the invisible mark?

    {"text": "...", "key": optional, "min_tokens": optional, "z_threshold": optional}
    -> {"object": "watermark.detection", "z_score", "p_value", "scored_tokens", "green_tokens",
        "green_fraction", "verdict", "min_tokens", "z_threshold", "key_id"}
    {"image": "<base64 or data URL>", "key": optional}
    -> {"object": "image.detection", "format", "size", "metadata", "pixels_match", "watermark"}

The text is tokenised by the served model's tokenizer (the one that generated it). `key` defaults
to the server's own (`--watermark`); a server without one needs it in the body (400 naming `key`
otherwise). The green share is the server's (`--watermark-gamma`), else the default. Behind the API
key like every route (the Gate). A wrong key is not an error: it scores z ~ 0, "not_watermarked".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import Field

from genforge.common.errors import GenforgeError
from genforge.models.watermark import (
    DEFAULT_GAMMA,
    DEFAULT_MIN_TOKENS,
    DEFAULT_Z_THRESHOLD,
    TextWatermark,
    detect_text,
)
from genforge.serve.labelling import Labelling
from genforge.serve.protocol import _Request

MAX_DETECT_CHARS = 1_000_000  # a request's text; the Gate's body limit applies first
OFFLOAD_CHARS = 4096  # longer texts are tokenised and scored in a worker thread


class DetectRequest(_Request):
    text: Annotated[str, Field(max_length=MAX_DETECT_CHARS)] | None = None
    image: str | None = None  # base64 PNG/JPEG, or a data URL
    key: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    min_tokens: Annotated[int, Field(ge=1)] | None = None
    z_threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None


def _image_bytes(value: str) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise GenforgeError("image: not valid base64 (send the file's bytes base64-encoded, or a data URL)",
                            param="image") from None


def detect_router(tokenizer: Any, labelling: Labelling | None, image_key: str | None = None) -> APIRouter:
    """`tokenizer`/`labelling`: an LM server's (None on an image server: text is refused); `image_key`:
    the server's invisible-mark key (`--image-watermark`), the default for image bodies."""
    router = APIRouter()

    def _detect_image(req: DetectRequest) -> dict:
        from genforge.data.image_labels import detect_image_bytes

        result = detect_image_bytes(_image_bytes(req.image), req.key or image_key)
        return {"object": "image.detection", **json.loads(json.dumps(result, default=float))}

    def _watermark(req: DetectRequest) -> TextWatermark:
        own = labelling.watermark
        gamma = own.gamma if own is not None else DEFAULT_GAMMA
        if req.key is not None:
            return TextWatermark.from_secret(req.key, gamma=gamma)
        if own is None:
            raise GenforgeError("key: this server has no watermark key of its own (it was started without "
                                "--watermark); give the key to check the text against", param="key")
        return own

    @router.post("/v1/detect")
    async def detect(body: DetectRequest) -> JSONResponse:
        if (body.text is None) == (body.image is None):
            raise GenforgeError("give exactly one of text and image", param="text")
        if body.image is not None:
            return JSONResponse(await asyncio.to_thread(_detect_image, body))
        if tokenizer is None:
            raise GenforgeError("text: this server serves an image model; score text on a language model's "
                                "server or with `genforge detect text --model RUN`", param="text")
        wm = _watermark(body)
        args = (body.text, tokenizer, wm, body.min_tokens or DEFAULT_MIN_TOKENS,
                DEFAULT_Z_THRESHOLD if body.z_threshold is None else body.z_threshold)
        result = await asyncio.to_thread(detect_text, *args) if len(body.text) > OFFLOAD_CHARS else detect_text(*args)
        return JSONResponse({"object": "watermark.detection", **result.as_dict()})

    return router
