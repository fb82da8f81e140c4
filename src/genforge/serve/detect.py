"""`POST /v1/detect`: is this text watermarked by this server's key (or a given one)?

    {"text": "...", "key": optional, "min_tokens": optional, "z_threshold": optional}
    -> {"object": "watermark.detection", "z_score", "p_value", "scored_tokens", "green_tokens",
        "green_fraction", "verdict", "min_tokens", "z_threshold", "key_id"}

The text is tokenised by the served model's tokenizer (the one that generated it). `key` defaults
to the server's own (`--watermark`); a server without one needs it in the body (400 naming `key`
otherwise). The green share is the server's (`--watermark-gamma`), else the default. Behind the API
key like every route (the Gate). A wrong key is not an error: it scores z ~ 0, "not_watermarked".
"""

from __future__ import annotations

import asyncio
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
    text: Annotated[str, Field(max_length=MAX_DETECT_CHARS)]
    key: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    min_tokens: Annotated[int, Field(ge=1)] | None = None
    z_threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    # Image bodies (an "image" field: base64 or a data URL) join here with the image part of issue 12;
    # `text` then becomes optional, exactly one of the two required.


def detect_router(tokenizer: Any, labelling: Labelling) -> APIRouter:
    router = APIRouter()

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
        wm = _watermark(body)
        args = (body.text, tokenizer, wm, body.min_tokens or DEFAULT_MIN_TOKENS,
                DEFAULT_Z_THRESHOLD if body.z_threshold is None else body.z_threshold)
        result = await asyncio.to_thread(detect_text, *args) if len(body.text) > OFFLOAD_CHARS else detect_text(*args)
        return JSONResponse({"object": "watermark.detection", **result.as_dict()})

    return router
