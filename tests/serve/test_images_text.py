"""/v1/images/generations and /v1/images/edits for a text-to-image run: the real `openai` client against
a real `genforge serve` process on a real port, over the session's tiny random pipeline."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import T2I_SIZE

from .conftest import CliServer
from .processes import serving

FAST = {"num_inference_steps": 3, "seed": 0}


@pytest.fixture(scope="module")
def server(t2i_run, tmp_path_factory) -> Iterator[CliServer]:
    with serving(t2i_run, [], logs=tmp_path_factory.mktemp("t2i-serve")) as (live,):
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> np.ndarray:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.mode == "L" and im.size == (T2I_SIZE, T2I_SIZE)
    return np.asarray(im)


@pytest.fixture(scope="module")
def upload() -> dict:
    image = np.zeros((T2I_SIZE, T2I_SIZE), np.uint8)
    image[3:13, 6:10] = 255  # a bright bar: a "1"
    mask = np.zeros_like(image)
    mask[:, T2I_SIZE // 2:] = 255  # regenerate the right half
    return {"image": image, "png": png(image), "mask": png(mask), "small_mask": png(mask[:8])}


def test_generations_take_the_prompt_and_extension_fields(client):
    def get(**extra):
        resp = client.images.generate(model="nano", prompt="a thick, slanted three", n=2, size="16x16",
                                      response_format="b64_json", extra_body={**FAST, **extra})
        assert [d.revised_prompt for d in resp.data] == [None, None]
        return [decode(d.b64_json).tobytes() for d in resp.data]  # pixels: each PNG's label is its own

    first = get(guidance_scale=4.0, negative_prompt="thin")
    assert len(first) == 2
    assert first == get(guidance_scale=4.0, negative_prompt="thin")  # same seed: same images
    assert first != get(guidance_scale=4.0, negative_prompt="thin", seed=1)
    assert first != get(guidance_scale=4.0)


def test_a_long_prompt_is_cut_and_shown_as_revised_prompt(client):
    long = " ".join(f"word{i}" for i in range(20))
    resp = client.images.generate(model="nano", prompt=long, n=1, response_format="b64_json", extra_body=FAST)
    revised = resp.data[0].revised_prompt
    assert revised and long.startswith(revised) and len(revised) < len(long)


def test_inpainting_edit_keeps_the_unmasked_pixels(client, upload):
    resp = client.images.edit(image=("in.png", upload["png"], "image/png"), mask=("mask.png", upload["mask"],
                              "image/png"), prompt="a seven", n=2, size="16x16", response_format="b64_json",
                              extra_body=FAST)
    half = T2I_SIZE // 2
    outs = [decode(d.b64_json) for d in resp.data]
    for out in outs:
        assert np.array_equal(out[:, :half], upload["image"][:, :half])  # exactly the upload
    assert any(not np.array_equal(out[:, half:], upload["image"][:, half:]) for out in outs)


def test_edit_without_a_mask_is_image_to_image(client, upload):
    def edit(strength):
        resp = client.images.edit(image=("in.png", upload["png"], "image/png"), prompt="a seven", n=1,
                                  response_format="b64_json", extra_body={**FAST, "num_inference_steps": 10,
                                                                          "strength": strength})
        return decode(resp.data[0].b64_json)

    low, high = edit(0.2), edit(1.0)
    assert not np.array_equal(low, high)


@pytest.mark.parametrize("kwargs, param, match", [
    ({"mask": ("m.png", "small_mask")}, "mask", "mask: 16x8 does not match the image's 16x16"),
    ({"image": ("in.png", b"GIF89a not really")}, "image", "image: the upload is not a readable image"),
    ({"extra_body": {"strength": 1.5}}, "strength", "less than or equal to 1"),
    ({"extra_body": {"strength": 0}}, "strength", "greater than 0"),
    ({"extra_body": {"strength": 0.01}}, "strength", "leaves no denoising step"),
    ({"size": "32x32"}, "size", "generates 16x16 images only"),
    ({"extra_body": {"sampler": "ddpm"}}, "sampler", "unknown field"),
])
def test_bad_edits_are_openai_style_400s(client, upload, kwargs, param, match):
    args = {"image": ("in.png", upload["png"], "image/png"), "prompt": "a seven", "n": 1,
            "response_format": "b64_json", "extra_body": FAST}
    for key in ("image", "mask"):
        if key in kwargs:
            name, data = kwargs.pop(key)
            args[key] = (name, upload.get(data, data) if isinstance(data, str) else data, "image/png")
    if "extra_body" in kwargs:
        args["extra_body"] = {**FAST, **kwargs.pop("extra_body")}
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(**args)
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert re.search(match, err["message"]), err["message"]


@pytest.mark.parametrize("body, param, match", [
    ({"n": 1}, "prompt", "prompt: required"),
    ({"prompt": "a", "guidance_scale": 50}, "guidance_scale", "less than or equal to 20"),
    ({"prompt": "a", "num_inference_steps": 1000}, "num_inference_steps", r"out of range \(1..100\)"),
    ({"prompt": "a", "negative_prompt": "b", "guidance_scale": 1}, "negative_prompt", "no effect without guidance"),
    ({"prompt": "a", "response_format": "url"}, "response_format", "use 'b64_json'"),
    ({"prompt": "a", "class": 3}, "class", "unknown field"),
    ({"prompt": "a", "n": 65}, "n", "less than or equal to 64"),
])
def test_bad_generations_are_openai_style_400s(server, body, param, match):
    r = httpx.post(server.v1 + "/images/generations", json={"num_inference_steps": 2, **body}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and re.search(match, err["message"]), err


def test_edits_need_multipart(server):
    r = httpx.post(server.v1 + "/images/edits", json={"prompt": "a"}, timeout=60)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(server.v1 + "/images/edits", data={"prompt": "a"}, files={"mask": ("m.png", b"x")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


def test_every_image_carries_the_aigc_label(client):
    from genforge.data.image_labels import read_label

    resp = client.images.generate(model="nano", prompt="a thick, slanted three", n=1, response_format="b64_json",
                                  extra_body=FAST)
    aigc = read_label(base64.b64decode(resp.data[0].b64_json))["aigc"]
    assert aigc["Label"] == "1" and aigc["ContentProducer"] == "genforge"
    g = aigc["genforge"]
    assert g["family"] == "latent-diffusion" and g["mode"] == "text-to-image"
    assert g["prompt"] == "a thick, slanted three" and g["model"] == "nano"
