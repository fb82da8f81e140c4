"""models/text_to_image.py on the session's tiny random pipeline (tests/conftest.py: t2i_run, t2i_pipe)."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from genforge.common.errors import DataError, GenforgeError
from genforge.models import text_to_image as t2i
from tests.conftest import T2I_MAX_TOKENS, T2I_SIZE


def digit(index: int = 3) -> np.ndarray:
    """A real digit from scikit-learn, 1 x 16 x 16 uint8, ink bright on dark as images.npy stores it."""
    from sklearn.datasets import load_digits

    small = (load_digits().images[index] * 255 / 16).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((T2I_SIZE, T2I_SIZE), Image.BICUBIC))[None]


def round_trip(pipe, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        decoded = pipe.vae.decode(t2i._encode(pipe, image) / pipe.vae.config.scaling_factor).sample
    return t2i._to_uint8(decoded / 2 + 0.5)[0]


def mean_abs(images: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(images.astype(float) - ref[None].astype(float)).mean())


def test_detects_and_loads_the_run_and_its_model_folder(t2i_run, t2i_pipe, tmp_path):
    assert t2i.is_text_to_image(t2i_run) and t2i.is_text_to_image(t2i_run / "model")
    assert t2i.model_folder(t2i_run) == t2i_run / "model"
    assert (t2i.image_size(t2i_pipe), t2i.image_channels(t2i_pipe)) == (T2I_SIZE, 1)
    (tmp_path / "genforge.json").write_text(json.dumps({"family": "diffusion"}))
    assert not t2i.is_text_to_image(tmp_path) and not t2i.is_text_to_image(tmp_path / "missing")
    with pytest.raises(GenforgeError, match="not a text-to-image model"):
        t2i.load_pipeline(tmp_path)


def test_text_to_image_shapes_and_determinism_by_seed(t2i_pipe):
    steps = []
    a = t2i.text_to_image(t2i_pipe, "a thick three", num_samples=3, steps=3, seed=0,
                          on_step=lambda done, total: steps.append((done, total)))
    assert a.shape == (3, 1, T2I_SIZE, T2I_SIZE) and a.dtype == np.uint8
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert np.array_equal(a, t2i.text_to_image(t2i_pipe, "a thick three", num_samples=3, steps=3, seed=0))
    assert not np.array_equal(a, t2i.text_to_image(t2i_pipe, "a thick three", num_samples=3, steps=3, seed=1))
    assert not np.array_equal(a, t2i.text_to_image(t2i_pipe, "a thin seven", num_samples=3, steps=3, seed=0))
    negative = t2i.text_to_image(t2i_pipe, "a thick three", negative_prompt="thin", num_samples=3, steps=3, seed=0)
    assert not np.array_equal(a, negative)
    unguided = t2i.text_to_image(t2i_pipe, "a thick three", guidance=1.0, num_samples=1, steps=2, seed=0)
    assert unguided.shape == (1, 1, T2I_SIZE, T2I_SIZE)


def test_batches_continue_one_generator(t2i_pipe, monkeypatch):
    monkeypatch.setattr(t2i, "BATCH", 2)
    five = t2i.text_to_image(t2i_pipe, "a two", num_samples=5, steps=2, seed=4)
    two = t2i.text_to_image(t2i_pipe, "a two", num_samples=2, steps=2, seed=4)
    assert five.shape[0] == 5 and np.array_equal(five[:2], two)  # the first batch is the same draw


def test_image_to_image_small_strength_stays_close_to_the_input(t2i_pipe):
    image = digit()
    ref = round_trip(t2i_pipe, image)  # the closest the VAE can come to the input
    ran = []
    low = t2i.image_to_image(t2i_pipe, "a three", image, 0.1, num_samples=4, steps=10, seed=0,
                             on_step=lambda done, total: ran.append(done))
    high = t2i.image_to_image(t2i_pipe, "a three", image, 1.0, num_samples=4, steps=10, seed=0)
    assert ran == [1]  # int(10 x 0.1) denoising steps
    assert low.shape == high.shape == (4, 1, T2I_SIZE, T2I_SIZE)
    assert mean_abs(low, ref) < 0.5 * mean_abs(high, ref)
    assert np.array_equal(low, t2i.image_to_image(t2i_pipe, "a three", image, 0.1, num_samples=4, steps=10, seed=0))


def test_inpaint_keeps_unmasked_pixels_exactly(t2i_pipe):
    image = digit()
    mask = np.zeros((T2I_SIZE, T2I_SIZE), bool)
    mask[4:10, 5:11] = True
    mask[:, 14] = True  # a one-pixel column: its latent cells are regenerated too (max-pooled mask)
    out = t2i.inpaint(t2i_pipe, "a seven", image, mask, num_samples=3, steps=4, seed=0)
    assert out.shape == (3, 1, T2I_SIZE, T2I_SIZE) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, ~mask], np.broadcast_to(image[:, ~mask], out[:, :, ~mask].shape))
    assert (out[:, 0, 4:10, 5:11] != image[0, 4:10, 5:11]).mean() > 0.5  # the masked area was regenerated
    assert (out[:, 0, :, 14] != image[0, :, 14]).mean() > 0.5
    assert np.array_equal(out, t2i.inpaint(t2i_pipe, "a seven", image, mask, num_samples=3, steps=4, seed=0))
    partial = t2i.inpaint(t2i_pipe, "a seven", image, mask, strength=0.5, num_samples=1, steps=4, seed=0)
    assert np.array_equal(partial[0][:, ~mask], image[:, ~mask])
    error = t2i.vae_round_trip_error(t2i_pipe, image, mask)
    assert error == pytest.approx(np.abs(round_trip(t2i_pipe, image).astype(float) - image)[:, ~mask].mean())
    assert error > 0  # what the copy-back hides (large: this VAE is untrained)


@pytest.mark.parametrize("call, kw, error, match", [
    ("image_to_image", {"strength": 0.0}, GenforgeError, r"strength: 0.0 is out of range \(0, 1\]"),
    ("image_to_image", {"strength": 1.5}, GenforgeError, r"strength: 1.5 is out of range"),
    ("image_to_image", {"strength": 0.05}, GenforgeError, "leaves no denoising step"),
    ("inpaint", {"mask": np.ones((8, 8), bool)}, DataError, "mask: 8 x 8 does not match the image's 16 x 16"),
    ("inpaint", {"mask": np.zeros((16, 16), bool)}, DataError, "no pixel is marked"),
    ("image_to_image", {"init_image": np.zeros((1, 8, 8), np.uint8)}, DataError, r"expected uint8 1 x 16 x 16"),
    ("text_to_image", {"guidance": 25.0}, GenforgeError, r"guidance: 25.0 is out of range"),
    ("text_to_image", {"steps": 0}, GenforgeError, r"steps: 0 is out of range \(1..100\)"),
    ("text_to_image", {"num_samples": 0}, GenforgeError, "num_samples: 0 is out of range"),
    ("text_to_image", {"negative_prompt": "thin", "guidance": 1.0}, GenforgeError, "no effect without guidance"),
    ("text_to_image", {"prompt": None}, GenforgeError, "a text prompt is required"),
])
def test_bad_requests(t2i_pipe, call, kw, error, match):
    args = {"prompt": "a three", "steps": 10, "seed": 0}
    if call == "image_to_image":
        args.update(init_image=digit(), strength=0.5)
    if call == "inpaint":
        args.update(image=digit(), mask=np.ones((16, 16), bool))
    args.update(kw)
    with pytest.raises(error, match=match):
        getattr(t2i, call)(t2i_pipe, **args)


def test_long_prompt_is_cut_with_a_warning_or_refused(t2i_pipe):
    words = " ".join(f"word{i}" for i in range(T2I_MAX_TOKENS))  # far more tokens than the encoder takes
    with pytest.warns(UserWarning, match=r"prompt: \d+ tokens, the text encoder takes 16; the last \d+ were dropped"):
        used = t2i.check_prompt(t2i_pipe, words)
    assert words.startswith(used) and len(used) < len(words)
    assert len(t2i_pipe.tokenizer(used)["input_ids"]) <= T2I_MAX_TOKENS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert t2i.check_prompt(t2i_pipe, "a thick three") == "a thick three"  # fits: no warning
    with pytest.raises(GenforgeError, match="takes at most 16"):
        t2i.check_prompt(t2i_pipe, words, long_prompt="refuse")
    with pytest.warns(UserWarning, match="truncated|dropped"):  # the generation functions cut it too
        t2i.text_to_image(t2i_pipe, words, num_samples=1, steps=1)


def test_unknown_tokens_warn_with_their_share(t2i_pipe):
    with pytest.warns(UserWarning, match=r"4 of 6 tokens \(67%\) are unknown"):
        t2i.check_prompt(t2i_pipe, "数字七 ☃")  # MiniLM's vocabulary lacks these characters


def test_image_files(t2i_pipe, tmp_path):
    big = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).convert("RGB")
    big.save(tmp_path / "in.png")
    arr = t2i.read_image(t2i_pipe, tmp_path / "in.png")
    assert arr.shape == (1, T2I_SIZE, T2I_SIZE) and arr.dtype == np.uint8  # grey, resized to the model's size
    white = np.zeros((32, 32), np.uint8)
    white[:, :8] = 255
    Image.fromarray(white).save(tmp_path / "mask.png")
    mask = t2i.read_mask(t2i_pipe, tmp_path / "mask.png", big.size)
    assert mask.shape == (T2I_SIZE, T2I_SIZE) and mask[:, :4].all() and not mask[:, 4:].any()
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[:16, :, 3] = 0  # OpenAI's convention: fully transparent = edit here
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    mask = t2i.read_mask(t2i_pipe, buf.getvalue(), big.size)
    assert mask[:8].all() and not mask[8:].any()
    with pytest.raises(DataError, match="mask: 16x16 does not match the image's 32x32"):
        t2i.read_mask(t2i_pipe, Image.new("L", (16, 16), 255), big.size)
    with pytest.raises(DataError, match="not a readable image"):
        t2i.read_image(t2i_pipe, b"this is not an image")
    with pytest.raises(DataError, match="does not exist"):
        t2i.read_image(t2i_pipe, tmp_path / "missing.png")
