"""`genforge eval RUN` for a latent-diffusion run (jobs/text_image_eval.py): held-out prompts in both
languages, attribute agreement over the attributes each prompt asked for, FID rows beside the floor,
inpainting that keeps the unmasked pixels; on a tiny model trained here, so the figures are checked
for consistency with the per-image records, not for quality."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from genforge.cli import main
from genforge.common.config import recipe_from_tree
from genforge.common.errors import ConfigError
from genforge.data.captions import HELDOUT_TEMPLATES, caption_for, is_chinese
from genforge.data.images import prepare_image_dataset
from genforge.jobs.text_image_eval import centre_mask, evaluate_text_image_run, heldout_prompts
from genforge.jobs.train import run_loaded_recipe

pytestmark = pytest.mark.slow

MODEL = {"vae": {"block_out_channels": [8, 16, 16], "norm_groups": 8, "steps": 4, "lr": 3e-3}, "max_tokens": 16,
         "block_out_channels": [16, 32], "attention_head_dim": 8, "norm_groups": 8, "num_train_timesteps": 100,
         "sample_prompts": ["a handwritten three"], "sample_steps": 2}
TRAIN = {"max_steps": 4, "batch_size": 32, "lr": 2e-3, "warmup_steps": 1, "eval_every": 4, "eval_batches": 1,
         "log_every": 2, "checkpoint_every": 4, "keep_last": 1, "seed": 0, "threads": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t2i-eval")
    prepare_image_dataset("builtin:digits-captions", root / "data", size=16, val_fraction=0.1)
    recipe = recipe_from_tree({"name": "ldm", "family": "latent-diffusion", "dataset": str(root / "data"),
                               "out_dir": str(root / "runs"), "model": MODEL, "train": TRAIN})
    return run_loaded_recipe(recipe).run.path


def test_heldout_prompts_cover_every_class_and_template_in_both_languages():
    classes = [str(d) for d in range(10)]
    prompts = heldout_prompts(classes, seed=0)
    assert len(prompts) == 10 * len(HELDOUT_TEMPLATES) and prompts == heldout_prompts(classes, seed=0)
    assert {p["language"] for p in prompts} == {"en", "zh"}
    for p in prompts:
        template = HELDOUT_TEMPLATES[p["template"]]
        assert p["language"] == ("zh" if is_chinese(template) else "en")
        assert p["prompt"] in {caption_for(p["class"], p["attributes"], template, variant=v) for v in range(3)}
    assert any(p["attributes"] for p in prompts) and any(not p["attributes"] for p in prompts)
    mask = centre_mask(16)
    assert mask.sum() == 64 and mask[8, 8] and not mask[0, 0]


def test_eval_scores_prompts_attributes_fid_and_inpainting_consistently(run: Path):
    summary = evaluate_text_image_run(run, samples_per_prompt=1, steps=2, num_fid=20, inpaint_images=3,
                                      classifier_steps=5)
    out = json.loads((run / "eval" / "text_image_metrics.json").read_text(encoding="utf-8"))
    h = out["heldout"]
    records = h["records"]
    assert len(records) == h["images"] == 10 * len(HELDOUT_TEMPLATES)
    # every figure is what the per-image records add up to
    assert h["class_accuracy"] == pytest.approx(np.mean([r["predicted"] == r["class"] for r in records]))
    zh = [r for r in records if r["language"] == "zh"]
    assert h["by_language"]["zh"] == pytest.approx(np.mean([r["predicted"] == r["class"] for r in zh]))
    for a, v in h["attributes"].items():
        asked = [r for r in records if a in r["asked"]]
        assert v["images"] == len(asked) > 0
        assert v["agreement"] == pytest.approx(np.mean([r["measured"][a] == r["asked"][a] for r in asked]))
    assert summary["heldout_class_accuracy"] == h["class_accuracy"]
    # FID of class prompts beside the real-vs-real floor, one image per held-out image
    f = out["class_prompts"]
    assert f["n_fid"] == f["model"]["n"] == 20 and f["floor"]["fid"] > 0 and summary["fid"] > 0
    # inpainting never touches an unmasked pixel; the VAE round trip it avoided is measured
    inp = out["inpainting"]
    assert inp["own class"]["unmasked_max_error"] == 0 == inp["another class"]["unmasked_max_error"]
    assert inp["vae_round_trip_unmasked_mae"] > 0 and 0 <= summary["inpaint_other_class_accuracy"] <= 1
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "## Text-to-image evaluation" in report and "Held-out phrasings" in report
    assert all((run / "plots" / f"eval-t2i-{i}.png").is_file() for i in range(3))


def test_the_cli_dispatches_a_text_to_image_run_and_refuses_a_set_without_attribute_edges(run: Path, tmp_path,
                                                                                          capsys):
    stats_path = Path(json.loads((run / "model" / "genforge.json").read_text())["dataset"]["path"]) / "stats.json"
    stats = json.loads(stats_path.read_text())
    edges = stats.pop("caption_attribute_edges")
    stats_path.write_text(json.dumps(stats))
    try:
        with pytest.raises(ConfigError, match="caption attribute edges"):
            evaluate_text_image_run(run, samples_per_prompt=1, steps=2, num_fid=20, inpaint_images=1)
        assert main(["eval", str(run)]) == 2
        assert "caption attribute edges" in capsys.readouterr().err
    finally:
        stats_path.write_text(json.dumps({**stats, "caption_attribute_edges": edges}))
