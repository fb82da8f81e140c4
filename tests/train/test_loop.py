import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from genforge.cli import main
from genforge.common.errors import RunError
from genforge.common.runs import RunDir
from genforge.jobs.train import run_recipe
from genforge.train.loop import lr_at


def recipe_hash(run: RunDir) -> str:
    return run.read_recipe()["_provenance"]["dataset"]["content_hash"]


def losses(run: RunDir, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in run.read_metrics() if key in r}


def test_short_run_validation_loss_falls_and_writes_the_run(tmp_path, char_dataset, tiny_recipe):
    out = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=60, keep_last=1))
    val = losses(out.run, "val_loss")
    assert val[60] < val[10] - 0.3, val
    run = out.run
    assert (run.model_dir / "model.safetensors").is_file()
    assert (run.plots_dir / "loss.png").stat().st_size > 1000
    report = run.report_path.read_text()
    assert "## Training" in report and "git commit" in report and "torch 2." in report
    assert recipe_hash(run) in report and "max_steps: 60" in report
    recipe = run.read_recipe()
    assert recipe["_provenance"]["dataset"]["content_hash"]
    assert recipe["_provenance"]["packages"]["torch"]
    names = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert names == ["best", "step-60"], names  # keep_last=1 pruned the older ones


def test_stopped_and_resumed_run_gives_the_same_losses(tmp_path, char_dataset, tiny_recipe):
    whole = run_recipe(tiny_recipe(tmp_path, char_dataset, name="whole")).run
    # a time budget this small stops the run after its first step (checkpointed, as any stop is)
    recipe = tiny_recipe(tmp_path, char_dataset, name="split", time_budget=0.000001)
    first = run_recipe(recipe)
    assert first.result.steps == 1 and first.result.stopped_early
    resumed = run_recipe(recipe, ["train.time_budget=null"], resume=True).run  # time_budget may change
    a, b = losses(whole), losses(resumed)
    assert set(a) <= set(b) and set(b) - set(a) <= {1}  # the stop logged step 1 too
    assert {s: b[s] for s in a} == a  # exactly, not approximately: resume is exact on CPU
    va, vb = losses(whole, "val_loss"), losses(resumed, "val_loss")
    assert {s: vb[s] for s in va} == va


def test_hugging_face_round_trip_gives_identical_logits(tmp_path, char_dataset, tiny_recipe):
    out = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=10))
    model = AutoModelForCausalLM.from_pretrained(out.run.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(out.run.model_dir)
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    state = torch.load(out.run.latest_checkpoint() / "state.pt", weights_only=True)["modules"]["model"]
    reference = AutoModelForCausalLM.from_config(model.config)
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.eval()(ids).logits)
    assert json.loads((out.run.model_dir / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert tok.chat_template and tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_resume_with_a_different_model_is_refused(tmp_path, char_dataset, tiny_recipe):
    recipe = tiny_recipe(tmp_path, char_dataset, time_budget=0.000001)
    run_recipe(recipe)
    with pytest.raises(RunError, match="different model config.*hidden_size: 32 -> 48"):
        run_recipe(recipe, ["model.hidden_size=48", "train.time_budget=null"], resume=True)
    with pytest.raises(RunError, match="already exists"):
        run_recipe(recipe)
    run = RunDir(tmp_path / "runs" / "r")
    assert [p.name for p in run.checkpoints()] == ["step-1"]  # the refused runs damaged nothing
    assert not run.segment_recipes()  # and recorded no segment that never ran


def test_time_budget_cuts_the_run_short_but_exports(tmp_path, char_dataset, tiny_recipe):
    out = run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=100000, time_budget=1.0))
    assert out.result.stopped_early and out.result.steps < 100000
    assert (out.run.model_dir / "config.json").is_file()


def test_moe_preset_trains(tmp_path, char_dataset, tiny_recipe):
    p = tiny_recipe(tmp_path, char_dataset, max_steps=6, eval_every=3)
    out = run_recipe(p, ["model.preset=lm-moe-tiny", "model.num_experts=2", "model.experts_per_token=1"])
    rows = [r for r in out.run.read_metrics() if "aux_loss" in r]
    assert rows and all(r["loss"] > 0 for r in rows)
    assert AutoModelForCausalLM.from_pretrained(out.run.model_dir).config.model_type == "mixtral"


def test_schedule_warms_up_then_decays():
    from genforge.common.config import TrainConfig
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(99, cfg, 100) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, cfg, 100) < lr_at(20, cfg, 100)


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1", "unknown key 'train.lerning_rate' (did you mean 'lr'?)"),
    ("train.lr=0", "train.lr: 0.0 is out of range"),
    ("model.presett=lm-nano", "unknown key 'model.presett' (did you mean 'preset'?)"),
    ("model.preset=lm-huge", "model.preset: 'lm-huge' is not one of"),
    ("dataset=/nonexistent", "dataset folder not found"),
])
def test_cli_train_errors_are_one_line_exit_2(tmp_path, char_dataset, tiny_recipe, capsys, override, message):
    code = main(["train", str(tiny_recipe(tmp_path, char_dataset)), "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def _denormals_survive() -> bool:
    tiny = torch.tensor([1e-39])  # a float32 denormal
    return bool((tiny * 1.0).item() != 0.0)


def test_denormal_flushing_does_not_outlive_the_run(tmp_path, char_dataset, tiny_recipe):
    assert _denormals_survive()
    run_recipe(tiny_recipe(tmp_path, char_dataset, max_steps=2, eval_every=2, checkpoint_every=2))
    assert _denormals_survive(), "train() left the thread flushing denormals to zero"
