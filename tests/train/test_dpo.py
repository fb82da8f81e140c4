"""DPO: the loss (ln 2 at the start, trl's numbers for sigmoid, label-smoothed sigmoid and IPO),
training raises preference accuracy, the reference stays frozen, preference rows, bad input."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from genforge.cli import main
from genforge.common.config import load_recipe
from genforge.common.errors import ConfigError, DataError
from genforge.common.runs import RunDir
from genforge.data.chat import IGNORE
from genforge.data.instructions import pydoc_preferences
from genforge.data.preference import PYDOC_PREFERENCES, read_preferences
from genforge.jobs.train import build_family, run_recipe
from genforge.train.dpo import dpo_loss
from tests.train.test_sft import LORA, _jsonl
from tests.train.test_sft import base_run as base_run  # noqa: F401  (the module fixture, shared)

CPU = torch.device("cpu")


def dpo_recipe(tmp_path: Path, base: Path | str, name: str = "dpo", dataset: str = PYDOC_PREFERENCES,
               lora: dict | None = None, dpo: dict | None = None, data: dict | None = None, **train) -> Path:
    tree = {"name": name, "family": "dpo", "base": str(base), "dataset": str(dataset),
            "out_dir": str(tmp_path / "runs"), "data": {"max_length": 256, **(data or {})},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_every": 4,
                      "eval_batches": 2, "log_every": 1, "checkpoint_every": 4, "seed": 5, **train}}
    if lora is not None:
        tree["lora"] = lora
    if dpo is not None:
        tree["dpo"] = dpo
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# ----------------------------------------------------------------------------- the loss

def test_equal_policy_and_reference_give_ln2():
    logps = -torch.rand(6) * 50
    other = -torch.rand(6) * 50
    for smoothing in (0.0, 0.2):
        losses, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.3, label_smoothing=smoothing)
        torch.testing.assert_close(losses, torch.full((6,), math.log(2)))
        assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def trl_dpo_loss(loss_type: str, beta: float, label_smoothing: float, token_logps: torch.Tensor,
                 completion_mask: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """trl's DPO loss (DPOTrainer._compute_loss, trl 1.16) on given per-token log-probabilities:
    the trainer's state is stubbed and the model returns them (reference log-probs precomputed)."""
    from trl import DPOTrainer

    def model(**kwargs):
        zeros = torch.zeros_like(token_logps)
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, label_smoothing=label_smoothing, loss_types=[loss_type],
        loss_weights=[1.0], ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        aux_loss_enabled=False, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity))
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
              "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, model, inputs, False)


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_the_loss_equals_trls(loss, smoothing):
    g = torch.Generator().manual_seed(0)
    pairs, length, beta = 5, 12, 0.2
    # rows: 5 chosen replies, then their 5 rejected ones, each of its own length after a prompt
    completion = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        start = int(torch.randint(1, 6, (1,), generator=g))
        completion[row, start:start + int(torch.randint(1, length - start + 1, (1,), generator=g))] = 1
    token_logps = -torch.rand(2 * pairs, length - 1, generator=g) * 4 * completion[:, 1:]
    logps, tokens = token_logps.sum(1), completion.sum(1)
    ratios = torch.randn(2 * pairs, generator=g) * 3
    if smoothing:
        # trl 1.16's sigmoid loss ignores label_smoothing; its conservative (label-smoothed) sigmoid is
        # `aot_unpaired`, which first sorts the chosen and the rejected log-ratios: sorted here already,
        # it is exactly the label-smoothed sigmoid loss
        ratios = torch.cat([ratios[:pairs].sort().values, ratios[pairs:].sort().values])
    ref = logps - ratios
    ours, _, _ = dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta, loss, smoothing,
                          tokens[:pairs], tokens[pairs:])
    trl_type = "aot_unpaired" if smoothing else loss
    theirs = trl_dpo_loss(trl_type, beta, smoothing, token_logps, completion, ref[:pairs], ref[pairs:])
    torch.testing.assert_close(ours.mean(), theirs)
    if smoothing:  # and the smoothing matters
        assert not torch.allclose(dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta)[0].mean(),
                                  theirs)


# ----------------------------------------------------------------------------- data

def test_pydoc_preferences_pair_a_topic_with_another_topics_paragraph():
    rows = pydoc_preferences(seed=0)
    assert rows == pydoc_preferences(seed=0) and len(rows) > 100
    answer = {r["topic"]: r["chosen"] for r in rows}
    assert all(r["chosen"] != r["rejected"] and r["rejected"] in answer.values() for r in rows)
    assert all(r["prompt"].endswith("?") or r["prompt"].endswith(".") for r in rows)
    assert len(read_preferences(PYDOC_PREFERENCES)) == len(rows)


def test_rows_in_chat_form_and_plain_form_encode_the_same(tmp_path, base_run):
    plain = {"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"}
    chat = {"messages": [{"role": "user", "content": "Say hi."}],
            "chosen": [{"role": "assistant", "content": "hi"}], "rejected": {"role": "assistant", "content": "go away"}}
    path = _jsonl(tmp_path, *([plain] * 4 + [chat] * 4))
    objective, data = build_family(load_recipe(dpo_recipe(tmp_path, base_run, dataset=str(path),
                                                          data={"val_fraction": 0})), CPU)
    batch = data.train_batch(0)
    n = batch["input_ids"].shape[0] // 2
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # chat row == plain row
    tok = objective.tokenizer
    for row, reply in ((0, "hi"), (n, "go away")):  # labels: the reply and the end of the turn only
        labels = batch["labels"][row]
        assert tok.decode(labels[labels != IGNORE][:-1]) == reply
        assert labels[labels != IGNORE][-1] == tok.eos_token_id


def test_only_the_last_reply_is_scored_in_a_multi_turn_prompt(tmp_path, base_run):
    row = {"prompt": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "earlier"},
                      {"role": "user", "content": "b?"}], "chosen": "yes", "rejected": "no"}
    objective, data = build_family(load_recipe(dpo_recipe(tmp_path, base_run, dataset=str(_jsonl(tmp_path, row, row)),
                                                          data={"val_fraction": 0}, batch_size=1)), CPU)
    labels = data.train_batch(0)["labels"]
    assert [objective.tokenizer.decode(r[r != IGNORE][:-1]) for r in labels] == ["yes", "no"]


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_training_raises_preference_accuracy_and_keeps_the_reference(tmp_path, base_run, lora):
    rows = [{"prompt": f"Is {c} good?", "chosen": "yes it is", "rejected": "no"} for c in "abcdefghijkl"]
    recipe = load_recipe(dpo_recipe(tmp_path, base_run, dataset=str(_jsonl(tmp_path, *rows)), lora=lora,
                                    data={"val_fraction": 0.25}, max_steps=8, batch_size=4, eval_every=8))
    objective, data = build_family(recipe, CPU)
    batch = next(iter(data.val_batches(1)))
    with torch.no_grad():
        start = objective.eval_step(batch)
        ref_before = objective.reference_logps(batch)
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert start["preference_accuracy"] == 0  # no reward is above another yet
    run = RunDir(recipe.run_dir).create()
    from genforge.train.loop import train

    train(objective, data, recipe.train, run, device=CPU)
    with torch.no_grad():
        end = objective.eval_step(batch)
        torch.testing.assert_close(objective.reference_logps(batch), ref_before)  # frozen / adapter disabled
    assert end["preference_accuracy"] == 1 and end["reward_margin"] > 0 and end["loss"] < math.log(2)
    if lora is None:
        assert objective.reference is not objective.model
        assert not any(p.requires_grad for p in objective.reference.parameters())
    else:
        assert objective.reference is None and all("lora_" in n for n, p in objective.model.named_parameters()
                                                    if p.requires_grad)
    logged = [r for r in run.read_metrics() if "rewards_chosen" in r]
    assert logged and {"rewards_rejected", "reward_margin", "preference_accuracy"} <= set(logged[-1])


def test_pydoc_preferences_through_the_cli(tmp_path, base_run):
    """From an SFT-like start (the base run's model/ folder), LoRA DPO on the built-in pairs: the
    report gives the reference's held-out likelihood accuracy and the final one."""
    recipe = dpo_recipe(tmp_path, base_run / "model", lora=LORA, dpo={"beta": 0.5, "loss": "ipo"}, max_steps=3,
                        eval_every=3, eval_batches=1)
    assert main(["train", str(recipe)]) == 0
    run = RunDir(tmp_path / "runs" / "dpo")
    report = run.report_path.read_text()
    assert "DPO (ipo, beta 0.5) with LoRA r 4" in report and "reference likelihood accuracy (held out)" in report
    assert "final val_preference_accuracy" in report and "final val_likelihood_accuracy" in report
    assert (run.adapters_dir / "dpo" / "adapter_model.safetensors").is_file()
    assert json.loads((run.model_dir / "config.json").read_text())["model_type"]


def test_a_full_fine_tuning_resume_is_exact(tmp_path, base_run):
    """The reference is rebuilt from the base on resume (it never trains), so a stopped and resumed
    run ends where a straight one does."""
    from safetensors.torch import load_file

    run_recipe(dpo_recipe(tmp_path, base_run, name="a", dpo={"beta": 0.1}))
    stopped = dpo_recipe(tmp_path, base_run, name="b", dpo={"beta": 0.1}, time_budget=0.000001)
    run_recipe(stopped)
    assert [p.name for p in RunDir(tmp_path / "runs" / "b").checkpoints()] == ["step-1"]
    with pytest.raises(ConfigError, match="dpo.beta changed from 0.1 to 0.5"):
        run_recipe(stopped, ["train.time_budget=null", "dpo.beta=0.5"], resume=True)
    run_recipe(stopped, ["train.time_budget=null"], resume=True)
    wa = load_file(tmp_path / "runs" / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "runs" / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "chosen": "y"}, ":2: a preference row needs prompt .*; rejected is missing"),
    ({"chosen": "y", "rejected": "z"}, r":2: a preference row needs .*; prompt \(or messages\) is missing"),
    ({"prompt": "x", "chosen": 3, "rejected": "z"}, ":2: `chosen` must be the reply"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
      "rejected": "b"}, ":2: the prompt's conversation ends with an assistant turn"),
    ({"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r":2: messages\[0\] must be an object"),
])
def test_bad_rows_name_file_and_line_and_write_nothing(tmp_path, base_run, row, message):
    path = _jsonl(tmp_path, {"prompt": "a", "chosen": "b", "rejected": "c"}, row)
    with pytest.raises(DataError, match=f"^{path}{message}"):
        run_recipe(dpo_recipe(tmp_path, base_run, dataset=str(path), lora=LORA))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, message", [
    ({"base": None}, "missing required key 'base': the dpo family"),
    ({"dpo": {"loss": "hinge"}}, "dpo.loss: 'hinge' is not one of sigmoid, ipo"),
    ({"dpo": {"label_smoothing": 0.5}}, r"dpo.label_smoothing: 0.5 is out of range \(must be < 0.5"),
    ({"dpo": {"loss": "ipo", "label_smoothing": 0.1}}, "dpo.label_smoothing: the ipo loss has no label smoothing"),
    ({"dpo": {"betta": 1}}, r"unknown key 'dpo.betta' \(did you mean 'beta'\?\)"),
    ({"data": {"packing": True}}, "unknown key 'data.packing'"),
    ({"family": "sft"}, "dpo: only the dpo family takes this key"),
    ({"dataset": "builtin:nope"}, "dataset builtin:nope: unknown built-in set; the dpo family has "
                                  "builtin:pydoc-preferences"),
])
def test_recipe_errors(tmp_path, base_run, change, message):
    path = dpo_recipe(tmp_path, base_run, dpo={"beta": 0.1})
    tree = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump({k: v for k, v in tree.items() if v is not None}))
    with pytest.raises((ConfigError, DataError), match=message):
        run_recipe(path)
    assert not (tmp_path / "runs").exists()
