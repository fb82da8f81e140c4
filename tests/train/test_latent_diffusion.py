"""The latent-diffusion family through `genforge train`: a VAE trained first (a nested run), latents
and caption states cached once, a UNet2DConditionModel trained and saved as a StableDiffusionPipeline
that loads and generates; exact resume; caption dropout; recipe mistakes named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline

from genforge.cli import main
from genforge.common.config import from_dict, recipe_from_tree
from genforge.common.errors import ConfigError, DataError
from genforge.common.runs import RunDir
from genforge.data.images import prepare_image_dataset
from genforge.jobs.train import run_loaded_recipe

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CHINESE = "零一二三四五六七八九"
TRAIN = {"batch_size": 32, "lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.0, "eval_every": 4, "eval_batches": 1,
         "log_every": 2, "checkpoint_every": 4, "keep_last": 1, "seed": 0, "threads": 1}
VAE = {"block_out_channels": [8, 16, 16], "norm_groups": 8, "steps": 6, "lr": 3e-3}
MODEL = {"vae": VAE, "max_tokens": 12, "block_out_channels": [16, 32], "attention_head_dim": 8, "norm_groups": 8,
         "num_train_timesteps": 100, "sample_prompts": ["a handwritten three", "手写的数字七"], "sample_steps": 2}


def write_captions(dataset: Path) -> None:
    """Contract 1's captions.jsonl with two phrasings per digit: 21 distinct captions keep the text cache instant
    (builtin:digits-captions has thousands)."""
    labels = np.load(dataset / "labels.npy")
    with open(dataset / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(labels.tolist()):
            row = {"index": i, "captions": [f"a handwritten {WORDS[d]}", f"the digit {d}"],
                   "heldout_captions": [f"手写的数字{CHINESE[d]}"]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "digits-captions16"
    prepare_image_dataset("builtin:digits", out, size=16, val_fraction=0.1)
    write_captions(out)
    return out


def _tree(name: str, dataset: Path, out: Path, steps: int, model: dict | None = None, **train) -> dict:
    return {"name": name, "family": "latent-diffusion", "dataset": str(dataset), "out_dir": str(out),
            "model": {**MODEL, **(model or {})}, "train": {**TRAIN, "max_steps": steps, **train}}


def _recipe(*args, **kwargs):
    return recipe_from_tree(_tree(*args, **kwargs))


@pytest.fixture(scope="module")
def ldm_run(digits: Path, tmp_path_factory) -> RunDir:
    """The tiny recipe through `genforge train`, as a user runs it."""
    out = tmp_path_factory.mktemp("runs")
    recipe = out / "ldm.yaml"
    recipe.write_text(yaml.safe_dump(_tree("ldm", digits, out, 8, ema_decay=0.9), allow_unicode=True), encoding="utf-8")
    assert main(["train", str(recipe)]) == 0
    return RunDir(out / "ldm")


def test_trains_vae_first_then_the_unet_and_saves_a_pipeline(ldm_run: RunDir):
    run = ldm_run
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    assert losses and all(np.isfinite(losses))
    # the VAE phase is a run of its own, through the same loop
    vae_rows = RunDir(run.path / "vae").read_metrics()
    assert vae_rows and all("recon" in r for r in vae_rows if "loss" in r)
    vae = AutoencoderKL.from_pretrained(run.path / "vae" / "model")
    meta = json.loads((run.model_dir / "genforge.json").read_text(encoding="utf-8"))
    assert meta["family"] == "latent-diffusion" and meta["classes"] == [str(d) for d in range(10)]
    assert meta["image_size"] == 16 and meta["text_encoder"]["max_tokens"] == 12
    saved_vae = json.loads((run.model_dir / "vae" / "config.json").read_text())
    assert saved_vae["scaling_factor"] == pytest.approx(meta["vae_scaling_factor"]) != 1.0
    assert saved_vae["in_channels"] == 1 and saved_vae["latent_channels"] == 4
    assert torch.equal(vae.encoder.conv_in.weight, AutoencoderKL.from_pretrained(run.model_dir / "vae").encoder.conv_in.weight)

    pipe = StableDiffusionPipeline.from_pretrained(run.model_dir)
    assert pipe.tokenizer.model_max_length == 12 and pipe.unet.config.cross_attention_dim == 384
    out = pipe("a handwritten seven", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 1) and np.isfinite(out).all()
    report = run.report_path.read_text(encoding="utf-8")
    assert "## Text-to-image samples" in report and "手写的数字七 (4 of 6 tokens unknown" in report and "distinct captions" in report
    assert (run.samples_dir / "prompts.png").is_file() and (run.plots_dir / "loss.png").is_file()


def test_the_training_grid_carries_the_aigc_label(ldm_run: RunDir):
    from genforge.data.image_labels import read_label

    label = read_label(ldm_run.samples_dir / "prompts.png")
    g = label["aigc"]["genforge"]
    assert label["aigc"]["Label"] == "1" and g["run"] == str(ldm_run.path.resolve())
    assert g["family"] == "latent-diffusion" and g["layout"] == "grid" and "watermark" not in g


def test_resume_is_exact_and_reuses_the_vae_phase(ldm_run, digits: Path, tmp_path: Path):
    run_loaded_recipe(_recipe("b", digits, tmp_path, 8, ema_decay=0.9, time_budget=1e-6))  # stops after step 1
    vae_file = tmp_path / "b" / "vae" / "model" / "diffusion_pytorch_model.safetensors"
    stamp = vae_file.stat().st_mtime_ns
    resumed = run_loaded_recipe(_recipe("b", digits, tmp_path, 8, ema_decay=0.9), resume=True)
    assert resumed.result.steps == 8 and vae_file.stat().st_mtime_ns == stamp  # the VAE was not retrained
    a = StableDiffusionPipeline.from_pretrained(ldm_run.model_dir).unet.state_dict()
    b = StableDiffusionPipeline.from_pretrained(resumed.run.model_dir).unet.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_trained_vae_is_loaded_by_path(ldm_run, digits: Path, tmp_path: Path):
    out = run_loaded_recipe(_recipe("load", digits, tmp_path, 2, model={"vae": str(ldm_run.path)}))
    assert not (out.run.path / "vae").exists()
    a = AutoencoderKL.from_pretrained(ldm_run.model_dir / "vae")
    b = AutoencoderKL.from_pretrained(out.run.model_dir / "vae")
    assert torch.equal(a.decoder.conv_out.weight, b.decoder.conv_out.weight)


def test_text_cache_and_caption_dropout(digits: Path, tmp_path: Path, monkeypatch):
    from genforge.train import latent_diffusion

    objective, data = latent_diffusion.build(_recipe("c", digits, tmp_path, 2, model={"vae": MODEL["vae"]}),
                                             torch.device("cpu"))
    cache = objective.cache
    # one entry per distinct caption, the same tensor every time, equal to what the pipeline computes
    assert len(cache) == 2 * 10 + 1  # two phrasings per digit, and ""
    assert cache.get("a handwritten three").data_ptr() == cache.get("a handwritten three").data_ptr()
    fresh = objective.pipeline().encode_prompt(["a handwritten three", ""], "cpu", 1, False)[0]
    assert torch.equal(cache.lookup(["a handwritten three", ""]), fresh)
    assert not torch.equal(cache.get(""), cache.get("a handwritten three"))
    # batches are a pure function of their index, captions drawn from each image's own list
    b0, b0_again = data.train_batch(0), data.train_batch(0)
    assert b0["captions"] == b0_again["captions"] and torch.equal(b0["mean"], b0_again["mean"])
    assert {c.split()[0] for c in data.train_batch(1)["captions"]} == {"a", "the"}
    # dropout swaps captions for "" at the configured rate
    seen: list[list[str]] = []
    real_lookup = cache.lookup
    monkeypatch.setattr(cache, "lookup", lambda caps: seen.append(caps) or real_lookup(caps))
    torch.manual_seed(0)
    objective._loss({k: v for k, v in data.train_batch(0).items()}, dropout=0.5)
    objective._loss(data.train_batch(1), dropout=0.0)
    assert 4 <= seen[0].count("") <= 28 and "" not in seen[1]


@pytest.mark.parametrize("model, message", [
    ({"caption_dropout": 1.0}, "model.caption_dropout"),
    ({"vae": {**VAE, "steps": 0}}, "model.vae.steps"),
    ({"vae": {**VAE, "block_out_channels": [12]}}, "model.vae.block_out_channels[0]"),
    ({"block_out_channels": [16, 32, 32, 32]}, "UNet levels"),
    ({"vae": "/nonexistent/vae"}, "no AutoencoderKL found"),
    ({"text_encoder": "/nonexistent/encoder"}, "model.text_encoder"),
    ({"max_tokens": 2}, "model.max_tokens"),
    ({"unet_channels": 3}, "unknown key 'model.unet_channels'"),
])
def test_bad_recipe_values_are_config_errors(digits: Path, tmp_path: Path, model: dict, message: str):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_loaded_recipe(_recipe("bad", digits, tmp_path, 2, model=model))


def test_the_cli_names_a_bad_value_on_one_line(digits: Path, tmp_path: Path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(_tree("bad", digits, tmp_path, 2, model={"caption_dropout": 1.0})))
    assert main(["train", str(recipe)]) == 2
    assert "model.caption_dropout: 1.0 would never show the model a caption" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_dataset_without_captions_is_refused(tmp_path: Path):
    ds = tmp_path / "plain"
    prepare_image_dataset("builtin:digits", ds, size=16)
    with pytest.raises(DataError, match="captions.jsonl"):
        run_loaded_recipe(_recipe("nocap", ds, tmp_path, 2))
    write_captions(ds)
    lines = (ds / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    (ds / "captions.jsonl").write_text("\n".join(lines[:5] + lines[6:]), encoding="utf-8")
    with pytest.raises(DataError, match="rows out of order or without captions"):
        run_loaded_recipe(_recipe("nocap", ds, tmp_path, 2))


def test_captions_the_encoder_cannot_read_are_warned_about_with_their_share():
    from transformers import AutoTokenizer

    from genforge.models.latent_diffusion import default_text_encoder_path
    from genforge.train.latent_diffusion import _unknown_token_share

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path())
    assert _unknown_token_share(tokenizer, ["a handwritten seven", "the digit 7"]) == 0.0
    # all-MiniLM-L6-v2's vocabulary lacks 七 (seven), 数 and 字 (digit): 3 of the 5 tokens
    with pytest.warns(UserWarning, match=r"60.0% of caption tokens are unknown .* '数字七'"):
        assert _unknown_token_share(tokenizer, ["数字七", "一二"]) == pytest.approx(0.6)


def test_the_shipped_recipe_is_valid():
    from genforge.common.config import load_recipe
    from genforge.models.latent_diffusion import LatentDiffusionSpec

    recipe = load_recipe(Path(__file__).parents[2] / "configs" / "latent-diffusion.yaml")
    spec = from_dict(LatentDiffusionSpec, recipe.model, "model")
    assert recipe.family == "latent-diffusion" and spec.vae_settings().factor == 4 and spec.text_encoder is None


def test_words_the_encoder_cannot_read_get_learned_embeddings_that_the_saved_pipeline_reads(tmp_path: Path):
    """Chinese numerals MiniLM reads as [UNK] (七, 六, 九, 零) become tokens whose embeddings train with the
    UNet; the encoder's other rows and layers stay frozen, and the exported pipeline reads the words."""
    from genforge.models.latent_diffusion import load_text_encoder

    ds = tmp_path / "zh"
    prepare_image_dataset("builtin:digits", ds, size=16, val_fraction=0.1)
    labels = np.load(ds / "labels.npy")
    with open(ds / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(labels.tolist()):
            f.write(json.dumps({"index": i, "captions": [f"a handwritten {WORDS[d]}", f"数字{CHINESE[d]}"],
                                "heldout_captions": []}, ensure_ascii=False) + "\n")
    out = run_loaded_recipe(_recipe("zh", ds, tmp_path, 6, lr=5e-2))
    meta = json.loads((out.run.model_dir / "genforge.json").read_text(encoding="utf-8"))
    assert {"七", "六", "九", "零", "数", "字"} <= set(meta["learned_tokens"]) and "一" not in meta["learned_tokens"]

    pipe = StableDiffusionPipeline.from_pretrained(out.run.model_dir)
    ids = pipe.tokenizer("数字七")["input_ids"]
    assert pipe.tokenizer.unk_token_id not in ids  # the saved tokenizer knows the word now
    fresh, tokenizer = load_text_encoder(None, 12)
    base = fresh.get_input_embeddings().weight
    table = pipe.text_encoder.get_input_embeddings().weight
    first = len(tokenizer)
    assert torch.equal(table[:first], base)  # every original row as it was: English encodes as before
    seven = tokenizer.convert_tokens_to_ids("七")
    assert seven == tokenizer.unk_token_id
    learned = table[first:]
    assert len(learned) == len(meta["learned_tokens"])
    # trained: the rows moved away from [UNK]'s and from each other
    assert (learned - base[tokenizer.unk_token_id]).norm(dim=1).min() > 0.1 * base[tokenizer.unk_token_id].norm()
    with torch.no_grad():
        a, b = pipe.encode_prompt(["数字七", "数字六"], "cpu", 1, False)[0]
    assert not torch.allclose(a, b)
    english = pipe.encode_prompt(["a handwritten three"], "cpu", 1, False)[0]
    fresh_pipe_states = fresh(**tokenizer(["a handwritten three"], padding="max_length", max_length=12,
                                         return_tensors="pt"))[0]
    assert torch.allclose(english, fresh_pipe_states, atol=1e-5)


def test_learned_tokens_freeze_after_their_steps_and_their_captions_join_the_cache(tmp_path: Path):
    """`learned_tokens_steps: 2`: the rows train for two steps, then stop; every caption is then a cache
    lookup equal to what the pipeline (with the rows written in) computes."""
    from genforge.train import latent_diffusion

    ds = tmp_path / "zh"
    prepare_image_dataset("builtin:digits", ds, size=16, val_fraction=0.1)
    labels = np.load(ds / "labels.npy")
    with open(ds / "captions.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(labels.tolist()):
            f.write(json.dumps({"index": i, "captions": [f"数字{CHINESE[d]}"], "heldout_captions": []},
                               ensure_ascii=False) + "\n")
    recipe = _recipe("freeze", ds, tmp_path, 4, model={"learned_tokens_steps": 2}, lr=5e-2)
    objective, data = latent_diffusion.build(recipe, torch.device("cpu"))
    opt = objective.optimizers(recipe.train)[0].optimizer
    assert objective.cache.live and "数字七" not in objective.cache.index
    rows = [objective.learned.rows.detach().clone()]
    for step in range(4):
        loss, _ = objective.loss(data.train_batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        rows.append(objective.learned.rows.detach().clone())
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])  # trained for two steps
    assert torch.equal(rows[2], rows[3]) and torch.equal(rows[3], rows[4])  # then frozen
    assert not objective.cache.live and "数字七" in objective.cache.index
    objective.learned.write_into(objective.text_encoder)
    with torch.no_grad():
        fresh = objective.pipeline().encode_prompt(["数字七", ""], "cpu", 1, False)[0]
    assert torch.allclose(objective.cache.lookup(["数字七", ""]), fresh, atol=1e-5)
