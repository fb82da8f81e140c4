"""POST /v1/images/generations with the real `openai` client against a real uvicorn on a real port."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from PIL import Image

from genforge.data.images import prepare_image_dataset
from genforge.jobs.train import run_recipe
from genforge.models.diffusion import DiffusionModel, DiffusionSpec, build_scheduler, build_unet
from genforge.models.image_generators import load_image_generator
from genforge.serve.images import images_router

TINY = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [1], "norm_groups": 8,
        "num_train_timesteps": 100}


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A class-conditional diffusion run on digits at 16x16, trained a few steps through the loop."""
    tmp = tmp_path_factory.mktemp("images-api")
    prepare_image_dataset("builtin:digits", tmp / "digits16", size=16, val_fraction=0.2, seed=0)
    tree = {"name": "digits", "family": "diffusion", "dataset": str(tmp / "digits16"), "out_dir": str(tmp / "runs"),
            "model": TINY, "train": {"max_steps": 10, "batch_size": 16, "warmup_steps": 2, "eval_every": 10,
                                     "eval_batches": 1, "checkpoint_every": 10, "threads": 1}}
    (tmp / "r.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
    return run_recipe(tmp / "r.yaml").run.path


@pytest.fixture(scope="module")
def url(image_run) -> Iterator[str]:
    app = FastAPI()
    app.include_router(images_router(image_run))
    with serve(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_with_the_openai_client(client):
    resp = client.images.generate(model="digits", prompt="3", n=2, size="16x16", response_format="b64_json",
                                  extra_body={"class": 3, "steps": 10})
    assert len(resp.data) == 2 and resp.created > 0
    images = [_decode(d.b64_json) for d in resp.data]
    assert all(im.size == (16, 16) and im.mode == "L" for im in images)


def test_seed_makes_it_reproducible_and_options_matter(client):
    def get(**extra) -> list[str]:
        resp = client.images.generate(model="digits", prompt="ignored text", n=2, size="16x16",
                                      response_format="b64_json", extra_body={"steps": 4, **extra})
        return [_decode(d.b64_json).tobytes() for d in resp.data]  # pixels: each PNG's label is its own

    a = get(seed=7, **{"class": "5"})
    assert a == get(seed=7, **{"class": "5"})
    assert a != get(seed=8, **{"class": "5"})
    assert a != get(seed=7, **{"class": "5"}, guidance=6.0)
    assert len(get(seed=1, sampler="ddpm")) == 2  # no class: the classes in turn


def test_prompt_names_the_class_when_class_is_absent(client):
    by_prompt = client.images.generate(model="d", prompt="4", n=1, size="16x16", response_format="b64_json",
                                       extra_body={"steps": 3, "seed": 2})
    by_class = client.images.generate(model="d", prompt="whatever", n=1, response_format="b64_json",
                                      extra_body={"steps": 3, "seed": 2, "class": 4})
    assert _decode(by_prompt.data[0].b64_json).tobytes() == _decode(by_class.data[0].b64_json).tobytes()


@pytest.mark.parametrize("kwargs, extra, param, match", [
    ({"size": "32x32"}, {}, "size", "generates 16x16 images only"),
    ({"size": "big"}, {}, "size", "not 'WxH'"),
    ({"response_format": "url"}, {}, "response_format", "use 'b64_json'"),
    ({}, {"class": "cat"}, "class", "unknown class 'cat'"),
    ({}, {"class": 10}, "class", "unknown class '10'"),
    ({}, {"guidance": 50}, "guidance", "out of range"),
    ({}, {"steps": 0}, "steps", "steps: 0 is out of range"),
    ({}, {"steps": 5000}, "steps", r"out of range \(1..100\)"),
    ({}, {"sampler": "euler"}, "sampler", "sampler"),
    ({"n": 0}, {}, "n", "greater than or equal to 1"),
    ({"n": 1000}, {}, "n", "less than or equal to 64"),
    ({}, {"colour": "red"}, "colour", "unknown field"),
    ({}, {"seed": -1}, "seed", "greater than or equal to 0"),
])
def test_bad_requests_are_openai_style_400s(client, kwargs, extra, param, match):
    args = {"model": "digits", "prompt": "3", "n": 1, "size": "16x16", "response_format": "b64_json", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**args, extra_body={"steps": 2, **extra})
    err = info.value.body
    assert info.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert __import__("re").search(match, err["message"]), err["message"]


def test_malformed_bodies(url):
    r = httpx.post(url + "/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/images/generations", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_unconditional_model_rejects_class_and_guidance(tmp_path):
    spec = DiffusionSpec(**TINY).resolved(sample_size=8, channels=1, num_classes=0)
    DiffusionModel(build_unet(spec), build_scheduler(spec)).save(tmp_path / "uncond")
    app = FastAPI()
    app.include_router(images_router(tmp_path / "uncond"))
    with serve(app) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        ok = c.images.generate(model="m", prompt="3", n=1, size="8x8", response_format="b64_json",
                               extra_body={"steps": 2})
        assert _decode(ok.data[0].b64_json).size == (8, 8)  # the prompt is ignored
        for extra, param in (({"class": 3}, "class"), ({"guidance": 2.0}, "guidance")):
            with pytest.raises(openai.BadRequestError) as info:
                c.images.generate(model="m", prompt="3", n=1, extra_body={"steps": 2, **extra})
            assert info.value.body["param"] == param and "unconditional" in info.value.body["message"]


def test_mounted_by_the_main_server(image_run):
    from genforge.serve.server import create_app

    with serve(create_app(image_run, served_model_name="digits")) as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        resp = c.images.generate(model="digits", prompt="7", n=1, size="16x16", response_format="b64_json",
                                 extra_body={"steps": 3})
        assert _decode(resp.data[0].b64_json).size == (16, 16)
        with pytest.raises(openai.BadRequestError):
            c.images.generate(model="digits", prompt="7", n=1, size="64x64")


class _SlowSteps:
    """The run's generator, each denoising step 50 ms slower, counting the steps it ran."""

    def __init__(self, inner):
        self._inner, self.steps = inner, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def sample(self, *args, on_step=None, **kwargs):
        def step(i, total):
            self.steps += 1
            time.sleep(0.05)
            if on_step is not None:
                on_step(i, total)

        return self._inner.sample(*args, on_step=step, **kwargs)


@pytest.fixture()
def slow_server(image_run, monkeypatch):
    import genforge.serve.images as images_mod

    holder = {}

    def load(run_dir, device="cpu"):
        holder["model"] = _SlowSteps(load_image_generator(run_dir, device=device))
        return holder["model"]

    monkeypatch.setattr(images_mod, "load_image_generator", load)
    app = FastAPI()
    app.include_router(images_router(image_run, max_queue=1, max_work=400))
    with serve(app) as base:
        yield base, holder["model"]


BODY = {"prompt": "3", "n": 1, "response_format": "b64_json", "steps": 40}


def test_image_queue_is_bounded_and_work_capped(slow_server):
    base, model = slow_server
    url = base + "/v1/images/generations"
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(httpx.post, url, json=BODY, timeout=60) for _ in range(2)]  # 1 runs, 1 waits
        deadline = time.monotonic() + 10
        while model.steps == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        r = httpx.post(url, json=BODY, timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "server_overloaded"
        assert [f.result().status_code for f in running] == [200, 200]
    r = httpx.post(url, json={**BODY, "n": 11, "steps": 40}, timeout=60)  # 440 passes > 400
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "400" in r.json()["error"]["message"]


def test_image_generation_stops_when_the_client_leaves(slow_server):
    base, model = slow_server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/images/generations", json={**BODY, "steps": 60}, timeout=0.5)
    time.sleep(0.5)
    ran = model.steps
    time.sleep(0.5)
    assert model.steps == ran and ran < 60  # stopped at the next step, not run to the end
    ok = httpx.post(base + "/v1/images/generations", json={**BODY, "steps": 2}, timeout=60)
    assert ok.status_code == 200  # the generator (and its lock) is free again


def test_deep_json_on_the_bare_router(url):
    r = httpx.post(url + "/v1/images/generations", content=b"[" * 100_000 + b"]" * 100_000,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_every_image_carries_the_aigc_label(client):
    from genforge.data.image_labels import detect_image

    resp = client.images.generate(model="digits", prompt="3", n=2, size="16x16", response_format="b64_json",
                                  extra_body={"class": 3, "steps": 4, "seed": 5})
    found = [detect_image(base64.b64decode(d.b64_json), "any-key") for d in resp.data]
    for r in found:
        aigc = r["metadata"]["aigc"]
        assert aigc["Label"] == "1" and aigc["genforge"]["family"] == "diffusion" and r["pixels_match"] is True
        assert aigc["genforge"]["seed"] == 5 and aigc["genforge"]["class"] == "3"
        assert r["watermark"]["verdict"] == "not_watermarked"  # no mark unless configured
    assert found[0]["metadata"]["aigc"]["ProduceID"] != found[1]["metadata"]["aigc"]["ProduceID"]


def test_serve_flags_add_the_visible_label_and_the_mark(image_run, tmp_path):
    """`genforge serve RUN --image-label --image-watermark-key-file F`: a real CLI server on a real port."""
    from genforge.data.image_labels import detect_image
    from tests.serve.processes import serving

    key = tmp_path / "key"
    key.write_text("serve-key\n")
    with serving(image_run, ["--image-label", "--image-watermark-key-file", str(key)], logs=tmp_path) as (live,):
        c = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=60)
        resp = c.images.generate(model="m", prompt="3", n=2, size="16x16", response_format="b64_json",
                                 extra_body={"steps": 4, "seed": 1})
        # POST /v1/detect: the server's own key by default, a given one otherwise; text refused here
        own = c.post("/detect", cast_to=object, body={"image": resp.data[0].b64_json})
        other = c.post("/detect", cast_to=object, body={"image": resp.data[0].b64_json, "key": "wrong"})
        assert own["object"] == "image.detection" and own["watermark"]["verdict"] == "watermarked"
        assert own["metadata"]["aigc"]["Label"] == "1" and own["pixels_match"] is True
        assert other["watermark"]["verdict"] == "not_watermarked"
        for body, param in (({"text": "hello"}, "text"), ({"image": "not base64!"}, "image"), ({}, "text")):
            with pytest.raises(openai.BadRequestError) as e:
                c.post("/detect", cast_to=object, body=body)
            assert e.value.body["param"] == param
    for d in resp.data:
        data = base64.b64decode(d.b64_json)
        r = detect_image(data, "serve-key")
        assert r["metadata"]["aigc"]["genforge"]["visible_label"] == "AI"
        assert r["watermark"]["verdict"] == "watermarked"
        assert detect_image(data, "wrong")["watermark"]["verdict"] == "not_watermarked"
