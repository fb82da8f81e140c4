"""Distillation: the KL (zero for identical models, forward vs reverse as torch's kl_div computes
them), training pulls a smaller fresh student toward the teacher, a LoRA student on chat data
through the CLI, and a teacher with another tokenizer is a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoTokenizer

from genforge.cli import main
from genforge.common.config import load_recipe
from genforge.common.errors import ConfigError
from genforge.common.runs import RunDir
from genforge.data.chat import PYDOC_INSTRUCTIONS
from genforge.jobs.train import build_family, run_recipe
from genforge.train.distill import distill_kl
from genforge.train.loop import train
from tests.train.test_sft import LORA, TINY
from tests.train.test_sft import base_run as base_run  # noqa: F401  (the module fixture, shared)

CPU = torch.device("cpu")
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, char_dataset) -> Path:
    """A teacher trained long enough to have opinions (a 3-step model is close to uniform)."""
    root = tmp_path_factory.mktemp("teacher")
    tree = {"name": "teacher", "family": "lm", "dataset": str(char_dataset), "out_dir": str(root), "model": TINY,
            "train": {"max_steps": 40, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2, "eval_every": 40,
                      "eval_batches": 1}}
    (root / "teacher.yaml").write_text(yaml.safe_dump(tree))
    run_recipe(root / "teacher.yaml")
    return root / "teacher"


SMALL = {**TINY, "hidden_size": 16, "intermediate_size": 32, "num_layers": 1}  # a student smaller than the teacher


def distill_recipe(tmp_path: Path, teacher: Path | str, dataset: str | Path, name: str = "distill",
                   base: Path | str | None = None, model: dict | None = None, distill: dict | None = None,
                   data: dict | None = None, lora: dict | None = None, **train) -> Path:
    tree = {"name": name, "family": "distill", "teacher": str(teacher), "dataset": str(dataset),
            "out_dir": str(tmp_path / "runs"), "data": data or {},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_every": 4,
                      "eval_batches": 2, "log_every": 1, "checkpoint_every": 4, "seed": 5, **train}}
    for key, value in (("base", base), ("model", model), ("distill", distill), ("lora", lora)):
        if value is not None:
            tree[key] = str(value) if isinstance(value, Path) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_kl_is_zero_for_identical_logits_and_matches_torch():
    logits = torch.randn(7, 11)
    assert distill_kl(logits, logits.clone(), temperature=2.0) == pytest.approx(0, abs=1e-6)
    assert distill_kl(logits, logits.clone(), temperature=2.0, reverse=True) == pytest.approx(0, abs=1e-6)
    # a known pair: KL(p || q) and KL(q || p) differ, each as kl_div computes it, times T^2
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    student = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))
    for t in (1.0, 2.0):
        p, q = F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)
        forward = F.kl_div(q, p, log_target=True, reduction="batchmean") * t * t
        reverse = F.kl_div(p, q, log_target=True, reduction="batchmean") * t * t
        torch.testing.assert_close(distill_kl(student, teacher, t), forward)
        torch.testing.assert_close(distill_kl(student, teacher, t, reverse=True), reverse)
        assert abs(float(forward - reverse)) > 1e-3
    # at T=1 the forward KL of these two is sum p log(p/q) = 0.7 ln(7/3) + 0.2 ln(2/3) + 0.1 ln(1/4)
    assert float(distill_kl(student, teacher, 1.0)) == pytest.approx(0.7 * 0.8473 - 0.2 * 0.4055 - 0.1 * 1.3863,
                                                                     abs=1e-3)


def test_a_student_identical_to_the_teacher_has_zero_kl(tmp_path, base_run):
    recipe = distill_recipe(tmp_path, base_run, PYDOC_INSTRUCTIONS, base=base_run, data={"max_length": 256})
    objective, data = build_family(load_recipe(recipe), CPU)
    with torch.no_grad():
        stats = objective.eval_step(next(iter(data.val_batches(1))))
    assert stats["kl"] == pytest.approx(0, abs=1e-5) and stats["ce"] > 0


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_a_smaller_fresh_student_moves_toward_the_teacher(tmp_path, teacher_run, char_dataset, kl):
    recipe = load_recipe(distill_recipe(tmp_path, teacher_run, char_dataset, model=SMALL, data={"max_length": 64},
                                        distill={"kl": kl, "alpha": 0.9, "temperature": 2}, max_steps=20, lr=3e-3,
                                        batch_size=8, eval_every=20))
    objective, data = build_family(recipe, CPU)
    assert objective.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(teacher_run / "model").get_vocab()
    batches = list(data.val_batches(2))
    with torch.no_grad():
        before = sum(objective.eval_step(b)["kl"] for b in batches)
    train(objective, data, recipe.train, RunDir(recipe.run_dir).create(), device=CPU)
    with torch.no_grad():
        after = sum(objective.eval_step(b)["kl"] for b in batches)
    assert after < 0.8 * before
    assert not any(p.requires_grad for p in objective.teacher.parameters())


def test_lora_student_on_chat_data_through_the_cli(tmp_path, base_run):
    recipe = distill_recipe(tmp_path, base_run, PYDOC_INSTRUCTIONS, base=base_run / "model", lora=LORA,
                            data={"max_length": 256}, max_steps=3, eval_every=3, eval_batches=1)
    assert main(["train", str(recipe)]) == 0
    run = RunDir(tmp_path / "runs" / "distill")
    assert (run.adapters_dir / "distill" / "adapter_model.safetensors").is_file()
    report = run.report_path.read_text()
    assert "forward KL at temperature 2, weight 0.5" in report and "final val_kl" in report
    assert any("kl" in row and "ce" in row for row in run.read_metrics())


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, base_run, capsys):
    other = tmp_path / "other-teacher"
    shutil.copytree(base_run / "model", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    recipe = distill_recipe(tmp_path, other, PYDOC_INSTRUCTIONS, base=base_run / "model")
    with pytest.raises(ConfigError, match=f"^teacher: the teacher {other} and the student "
                                          f"{(base_run / 'model').resolve()} have different tokenizers"):
        run_recipe(recipe)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: teacher: the teacher") and "must use the teacher's tokenizer" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, message", [
    ({"teacher": None}, "missing required key 'teacher'"),
    ({"model": {"preset": "lm-nano"}}, "distill: give the student either as `base` .* not both"),
    ({"base": None}, "distill: give the student either as `base` .* not neither"),
    ({"distill": {"kl": "js"}}, "distill.kl: 'js' is not one of forward, reverse"),
    ({"distill": {"alpha": 2}}, r"distill.alpha: 2.0 is out of range \(must be <= 1\)"),
    ({"family": "lm"}, "base: the lm family does not start from a base model"),
])
def test_recipe_errors(tmp_path, base_run, change, message):
    path = distill_recipe(tmp_path, base_run, PYDOC_INSTRUCTIONS, base=base_run, distill={"alpha": 0.5})
    tree = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump({k: v for k, v in tree.items() if v is not None}))
    with pytest.raises(ConfigError, match=message):
        run_recipe(path)
