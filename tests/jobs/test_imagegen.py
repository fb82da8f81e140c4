"""`genforge generate` / `eval` / `augment` for image runs: diffusion, VAE and GAN, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from genforge.cli import main
from genforge.common.errors import GenforgeError
from genforge.data.images import prepare_image_dataset
from genforge.jobs.imagegen import generate_grid
from genforge.jobs.train import run_recipe

TINY_DIFFUSION = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [1],
                  "norm_groups": 8, "num_train_timesteps": 100}
TRAIN = {"batch_size": 32, "lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0, "eval_batches": 1,
         "log_every": 5, "seed": 0, "threads": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagegen")
    prepare_image_dataset("builtin:digits", root / "digits8", val_fraction=0.2, seed=0)
    return root


def _train(root: Path, name: str, family: str, model: dict, steps: int, **extra) -> Path:
    data = extra.pop("data", {})
    tree = {"name": name, "family": family, "dataset": str(root / "digits8"), "out_dir": str(root / "runs"),
            "model": model, "data": data,
            "train": {**TRAIN, "max_steps": steps, "eval_every": steps, "checkpoint_every": steps, **extra}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(tree), encoding="utf-8")
    return run_recipe(root / f"{name}.yaml").run.path


@pytest.fixture(scope="module")
def diffusion_run(root) -> Path:
    return _train(root, "diff", "diffusion", TINY_DIFFUSION, 60, ema_decay=0.9)


@pytest.fixture(scope="module")
def gan_run(root) -> Path:
    return _train(root, "gan", "gan", {"loss": "dcgan", "latent_dim": 8, "g_channels": 8, "d_channels": 8,
                                       "conditional": False}, 5, grad_clip=None)


@pytest.fixture(scope="module")
def vae_run(root) -> Path:
    return _train(root, "vae", "vae", {"latent_dim": 4, "block_out_channels": [8, 16]}, 5,
                  data={"exclude_classes": ["0"]})


def test_grid_and_single_images_for_a_class(diffusion_run, tmp_path):
    out = generate_grid(diffusion_run, num_samples=6, class_label="3", guidance=3.0, steps=5, sampler="ddim",
                        seed=1, out=tmp_path / "grid.png")
    assert out == tmp_path / "grid.png" and Image.open(out).size[0] > 8 * 3
    singles = sorted((tmp_path / "grid").glob("*.png"))
    assert len(singles) == 6 and Image.open(singles[0]).size == (8, 8)
    settings = json.loads((tmp_path / "grid.json").read_text())
    assert settings["class"] == ["3"] and settings["guidance"] == 3.0 and settings["seed"] == 1
    again = generate_grid(diffusion_run, num_samples=6, class_label=3, guidance=3.0, steps=5, sampler="ddim",
                          seed=1, out=tmp_path / "again.png")
    assert Image.open(again).tobytes() == Image.open(out).tobytes()  # index or name, same seed: same images


def test_ddpm_and_default_output_and_cli(diffusion_run, capsys):
    out = generate_grid(diffusion_run, num_samples=4, class_label=None, guidance=None, steps=4, sampler="ddpm",
                        seed=None, out=None)
    assert out.parent.name == "samples" and out.is_file()
    code = main(["generate", str(diffusion_run), "--num-samples", "4", "--class", "7", "--guidance", "2",
                 "--steps", "3", "--sampler", "ddim", "--out", str(out.parent / "cli.png")])
    assert code == 0 and "cli.png" in capsys.readouterr().out


@pytest.mark.parametrize("kw, match", [
    ({"class_label": "cat"}, "unknown class 'cat'"),
    ({"class_label": "12"}, "unknown class '12'"),
    ({"guidance": 21.0}, "guidance: 21.0 is out of range"),
    ({"steps": 0}, "steps: 0 is out of range"),
    ({"steps": 1000}, r"steps: 1000 is out of range \(1..100\)"),
    ({"num_samples": 0}, "num-samples: 0 is out of range"),
    ({"out": "grid.jpg"}, "must be a .png"),
])
def test_bad_generate_requests(diffusion_run, tmp_path, kw, match):
    args = {"num_samples": 2, "class_label": None, "guidance": None, "steps": 2, "sampler": "ddim", "seed": 0,
            "out": tmp_path / "g.png", **kw}
    with pytest.raises(GenforgeError, match=match):
        generate_grid(diffusion_run, **args)
    assert not (tmp_path / "g.png").exists()


def test_cli_bad_input_is_one_line_and_exit_2(diffusion_run, tmp_path, capsys):
    assert main(["generate", str(diffusion_run), "--class", "cat", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: class: unknown class 'cat'") and "\n" not in err
    assert main(["generate", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2


@pytest.mark.parametrize("which", ["gan_run", "vae_run"])
def test_vae_and_gan_runs_generate_and_refuse_diffusion_options(which, request, tmp_path):
    run = request.getfixturevalue(which)
    out = generate_grid(run, num_samples=5, class_label=None, guidance=None, steps=None, sampler="ddim", seed=0,
                        out=tmp_path / "g.png")
    assert len(list((tmp_path / "g").glob("*.png"))) == 5
    for kw, match in (({"class_label": "3"}, "unconditional"), ({"guidance": 3.0}, "only diffusion"),
                      ({"steps": 10}, "only diffusion"), ({"sampler": "ddpm"}, "no sampler")):
        args = {"num_samples": 2, "class_label": None, "guidance": None, "steps": None, "sampler": "ddim", **kw}
        with pytest.raises(GenforgeError, match=match):
            generate_grid(run, seed=0, out=tmp_path / "bad.png", **args)
    assert out.is_file()


def test_generate_refuses_a_run_without_an_image_model(root, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "recipe.yaml").write_text("name: r\nfamily: diffusion\n")
    with pytest.raises(GenforgeError, match="not an image run|no diffusion model"):
        generate_grid(tmp_path / "r", num_samples=2, out=tmp_path / "x.png")


@pytest.mark.slow
def test_eval_writes_metrics_and_report(diffusion_run, gan_run, capsys):
    from genforge.jobs.image_eval import evaluate_image_run

    result = evaluate_image_run(diffusion_run, num_samples=70, steps=4, ddpm_samples=2, classifier_steps=40)
    for key in ("fid", "fid_low", "fid_high", "kid", "floor_fid", "baseline_fid", "class_accuracy", "coverage",
                "nn_distance", "floor_nn_distance", "baseline_nn_distance", "samples_per_s", "ddpm_class_accuracy"):
        assert key in result, key
    assert result["fid_low"] <= result["fid"] <= result["fid_high"]
    data = json.loads((diffusion_run / "eval" / "image_metrics.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[0].startswith("real held-out") and names[-1] == "PCA+GMM baseline" and len(names) == 6
    report = (diffusion_run / "report.md").read_text()
    assert "## Evaluation" in report and "PCA+GMM baseline" in report and "## Training" in report
    assert (diffusion_run / "classifier" / "model" / "config.json").is_file()
    assert (diffusion_run / "plots" / "eval-fid.png").is_file()
    # a sibling run on the same dataset reuses the classifier instead of training another; the CLI prints
    assert main(["eval", str(gan_run), "--num-samples", "30"]) == 0
    out = capsys.readouterr().out
    assert "fid:" in out and "\nclass_accuracy:" not in out  # an unconditional GAN has no class accuracy
    assert (gan_run / "classifier" / "model" / "config.json").is_file()


@pytest.mark.slow
def test_eval_of_a_vae_that_left_a_class_out(vae_run, diffusion_run):
    from genforge.jobs.image_eval import evaluate_image_run

    evaluate_image_run(diffusion_run, num_samples=20, steps=2, ddpm_samples=0, classifier_steps=40)  # trains it
    result = evaluate_image_run(vae_run, num_samples=30)
    rows = json.loads((vae_run / "eval" / "image_metrics.json").read_text())["rows"]
    # the floor and the references leave out class 0 as the run did
    assert rows[0]["per_class_accuracy"][0] != rows[0]["per_class_accuracy"][0]  # NaN: no class-0 images
    assert result["model"] == "VAE" and 0 <= result["coverage"] <= 1
    with pytest.raises(GenforgeError, match="too few"):
        evaluate_image_run(vae_run, num_samples=1)


@pytest.mark.slow
def test_augmentation_study_runs_end_to_end(diffusion_run):
    from genforge.jobs.augment import augmentation_study

    result = augmentation_study(diffusion_run, "8", keep_fraction=0.1, seed=0, steps=3, classifier_steps=30)
    assert result["minority_class"] == "8" and result["generated"] > 0
    assert 0 <= result["recall_without"] <= 1 and 0 <= result["recall_with"] <= 1
    assert result["generator_trained_on_reduced_set"] is False  # the run saw the full set: flagged
    assert "## Augmentation study" in (diffusion_run / "report.md").read_text()
    with pytest.raises(GenforgeError, match="keep-fraction"):
        augmentation_study(diffusion_run, "8", keep_fraction=0.0)
    with pytest.raises(GenforgeError, match="unknown class"):
        augmentation_study(diffusion_run, "x")


def test_generate_labels_every_png_and_marks_them_when_asked(diffusion_run, tmp_path, capsys):
    from genforge.data.image_labels import detect_image, read_label

    key_file = tmp_path / "key"
    key_file.write_text("gen-key\n")
    out = tmp_path / "marked.png"
    assert main(["generate", str(diffusion_run), "--num-samples", "4", "--class", "3", "--steps", "3",
                 "--watermark-key-file", str(key_file), "--visible-label", "--out", str(out)]) == 0
    for png in [out, *sorted((tmp_path / "marked").glob("*.png"))]:
        r = detect_image(png, "gen-key")
        g = r["metadata"]["aigc"]["genforge"]
        assert g["run"] == str(diffusion_run) and g["family"] == "diffusion" and r["pixels_match"] is True
        assert g["visible_label"] == ("AI-generated" if png == out else "AI")  # 8 px singles: the short form
        assert g["watermark"] == "genforge-dct-sign-v1"
        assert r["watermark"]["verdict"] == "watermarked"
        assert detect_image(png, "other-key")["watermark"]["verdict"] == "not_watermarked"
    # Without the flags: metadata only, pixels as the model made them.
    plain = generate_grid(diffusion_run, num_samples=4, class_label="3", steps=3, out=tmp_path / "plain.png")
    g = read_label(plain)["aigc"]["genforge"]
    assert g["model"] == diffusion_run.name and "watermark" not in g and "visible_label" not in g
    assert main(["generate", str(diffusion_run), "--watermark", "", "--out", str(tmp_path / "x.png")]) == 2
    assert "--watermark: the key is empty" in capsys.readouterr().err
