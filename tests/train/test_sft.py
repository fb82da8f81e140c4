"""SFT through the one loop: LoRA adapters that peft reloads, merged models that equal them, DoRA
with packing, full fine-tuning, exact resume of a LoRA run, the prompt serve renders, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from genforge.cli import main
from genforge.common.config import from_dict, load_recipe, to_dict
from genforge.common.errors import ConfigError, DataError, RunError
from genforge.common.runs import RunDir
from genforge.data.chat import IGNORE, PYDOC_INSTRUCTIONS, Conversation, encode_conversation
from genforge.jobs.merge import merge_adapter
from genforge.jobs.train import build_family, run_recipe
from genforge.models.lm import (
    DEFAULT_CHAT_TEMPLATE,
    LMSpec,
    build_lm_config,
    create_lm,
    load_lm,
    resolve_chat_template,
    save_lm,
)
from genforge.serve.chat import render_chat
from genforge.serve.protocol import ChatMessage
from genforge.train.loop import train

CPU = torch.device("cpu")
STOP = 0.000001  # a time budget that stops a run after its first (checkpointed) step
TINY = {"preset": "lm-nano", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 64, "context_length": 256}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, char_dataset) -> Path:
    """A genforge LM run to fine-tune (char-level, context 256 so the pydoc answers fit)."""
    root = tmp_path_factory.mktemp("base")
    tree = {"name": "base", "family": "lm", "dataset": str(char_dataset), "out_dir": str(root), "model": TINY,
            "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 3, "eval_batches": 1}}
    (root / "base.yaml").write_text(yaml.safe_dump(tree))
    run_recipe(root / "base.yaml")
    return root / "base"


def sft_recipe(tmp_path: Path, base: Path | str, name: str = "sft", dataset: str = PYDOC_INSTRUCTIONS,
               lora: dict | None = None, data: dict | None = None, **train) -> Path:
    """An sft recipe small enough to train in a second or two (lora=None: full fine-tuning)."""
    tree = {"name": name, "family": "sft", "base": str(base), "dataset": str(dataset),
            "out_dir": str(tmp_path / "runs"), "data": {"max_length": 256, **(data or {})},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_every": 3,
                      "eval_batches": 2, "log_every": 1, "checkpoint_every": 3, "seed": 5, **train}}
    if lora is not None:
        tree["lora"] = lora
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
GOOD = {"instruction": "Say hi.", "output": "hi"}


def _jsonl(tmp_path: Path, *rows, name: str = "rows") -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_run):
    """(objective, a validation batch, run) of a LoRA run from a genforge run, the objective kept."""
    tmp = tmp_path_factory.mktemp("lora")
    recipe = load_recipe(sft_recipe(tmp, base_run, lora=LORA))
    objective, data = build_family(recipe, CPU)
    run = RunDir(recipe.run_dir).create()
    run.write_recipe(to_dict(recipe))
    train(objective, data, recipe.train, run, device=CPU)
    return objective, next(iter(data.val_batches(1))), run


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_adapter_reloads_with_peft_and_the_merged_model_equals_it(lora_run, base_run, tmp_path):
    objective, batch, run = lora_run
    trained = logits(objective.model, batch)
    adapter = run.adapters_dir / "sft"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((base_run / "model").resolve())
    base = AutoModelForCausalLM.from_pretrained(base_run / "model")
    before = logits(base, batch)
    reloaded = PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-5, rtol=1e-5)
    assert (trained - before).abs().max() > 1e-3  # the adapter changed the model
    # model/ is the merged model: plain transformers, no peft
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(run.model_dir), batch), trained,
                               atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(run.model_dir).chat_template == DEFAULT_CHAT_TEMPLATE
    # only LoRA matrices trained, and a checkpoint holds only them
    assert all("lora_" in n for n, p in objective.model.named_parameters() if p.requires_grad)
    state = torch.load(run.checkpoints()[-1] / "state.pt", weights_only=True)
    assert state["modules"]["adapter"] and all("lora_" in k for k in state["modules"]["adapter"])

    out = tmp_path / "merged"
    assert main(["merge", str(run.path), "--adapter", "sft", "--out", str(out)]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out), batch), trained,
                               atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out).chat_template == DEFAULT_CHAT_TEMPLATE


def test_training_renders_the_prompt_serve_renders(lora_run):
    _, _, run = lora_run
    _, tok = load_lm(run.model_dir)  # what `genforge serve RUN/model` loads
    template = resolve_chat_template(tok)
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a with?"},
            {"role": "assistant", "content": "A statement."}, {"role": "user", "content": "And for?"},
            {"role": "assistant", "content": "A loop."}]
    ex = encode_conversation(tok, template, Conversation(msgs, "x"), {tok.eos_token_id}, tok.eos_token_id)
    for turn in (2, 4):  # the prompt before each assistant turn, as a chat request would send it
        prompt = render_chat(tok, template, [ChatMessage(**m) for m in msgs[:turn]])
        assert ex.input_ids[:len(prompt)] == prompt
        # the first target is the reply's first token, predicted from the prompt's last position
        assert ex.labels[len(prompt) - 2] == IGNORE and ex.labels[len(prompt) - 1] == ex.input_ids[len(prompt)]


def test_the_served_reply_ends_where_training_taught_it(tmp_path, base_run):
    """End to end: a model fine-tuned to answer "ok" is served the prompt it was trained on and
    stops after "ok" on its own (the EOS it learned), not at max_tokens."""
    from fastapi.testclient import TestClient

    from genforge.serve.server import create_app

    rows = [{"instruction": f"question {i} " + "abc"[i % 3] * (i % 5), "output": "ok"} for i in range(40)]
    recipe = sft_recipe(tmp_path, base_run, name="ok", dataset=str(_jsonl(tmp_path, *rows)), max_steps=60,
                        batch_size=8, eval_every=60, checkpoint_every=60, data={"max_length": 128})
    run_recipe(recipe)
    with TestClient(create_app(tmp_path / "runs" / "ok", dtype="float32")) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "question 99 b"}],
                                                      "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "ok"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_dora_with_packing_and_ema_through_the_cli(tmp_path, base_run):
    recipe = sft_recipe(tmp_path, base_run / "model", name="dora", lora={**LORA, "use_dora": True},
                        data={"packing": True}, ema_decay=0.9)  # EMA over the adapter's weights only
    assert main(["train", str(recipe)]) == 0
    run = RunDir(tmp_path / "runs" / "dora")
    adapter = run.adapters_dir / "dora"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert any("tokens_per_s" in row for row in run.read_metrics())  # packed rows: a fixed token count
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_run / "model"), adapter)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(run.model_dir), batch),
                               logits(peft, batch), atol=1e-4, rtol=1e-4)
    assert "DoRA r 4" in run.report_path.read_text()


def test_full_fine_tuning_from_an_hf_folder(tmp_path, base_run):
    run_recipe(sft_recipe(tmp_path, base_run / "model", name="full", max_steps=10, eval_every=5))
    run = RunDir(tmp_path / "runs" / "full")
    assert not run.adapters_dir.exists()
    before = load_file(base_run / "model" / "model.safetensors")
    after = load_file(run.model_dir / "model.safetensors")
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)
    val = [r["val_loss"] for r in run.read_metrics() if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert "full fine-tuning" in run.report_path.read_text()


def test_lora_resume_is_exact(tmp_path, base_run):
    straight = sft_recipe(tmp_path, base_run, name="a", lora={**LORA, "dropout": 0.1})
    run_recipe(straight)
    stopped = sft_recipe(tmp_path, base_run, name="b", lora={**LORA, "dropout": 0.1}, time_budget=STOP)
    run_recipe(stopped)
    b = RunDir(tmp_path / "runs" / "b")
    assert [p.name for p in b.checkpoints()] == ["step-1"]
    with pytest.raises(RunError, match=r"different model config \(lora: \{'r': 4, .* -> \{'r': 8"):
        run_recipe(stopped, ["train.time_budget=null", "lora.r=8"], resume=True)
    run_recipe(stopped, ["train.time_budget=null"], resume=True)
    wa = load_file(tmp_path / "runs" / "a" / "adapters" / "a" / "adapter_model.safetensors")
    wb = load_file(b.adapters_dir / "b" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- bad input

def test_bad_rows_name_file_and_line_and_write_nothing(tmp_path, base_run):
    cases = [
        (_jsonl(tmp_path, GOOD, {"instruction": "x"}, name="a"), DataError, ":2: an alpaca row needs string fields"),
        (_jsonl(tmp_path, {"messages": [{"role": "user", "content": "hi"}]}, name="b"), DataError,
         ":1: the conversation has no assistant turn"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=f"^{path}{message}"):
            run_recipe(sft_recipe(tmp_path, base_run, dataset=str(path), lora=LORA))
        assert not (tmp_path / "runs" / "sft").exists()


def test_a_template_that_cannot_render_names_the_row(tmp_path, base_run):
    bad = tmp_path / "bad-template"
    shutil.copytree(base_run / "model", bad)
    tok = AutoTokenizer.from_pretrained(bad)
    tok.chat_template = "{{ raise_exception('only user messages, please') }}"
    tok.save_pretrained(bad)
    path = _jsonl(tmp_path, GOOD)
    with pytest.raises(DataError, match=f"^{path}:1: the chat template cannot render this conversation: "
                                        "only user messages, please"):
        run_recipe(sft_recipe(tmp_path, bad, dataset=str(path)))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: d.mkdir(), r"^base: .* is not a Hugging Face model folder \(no config.json\)"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"_class_name": "ConvVAE"}')),
     "^base: cannot load a causal LM from"),
])
def test_a_base_that_is_not_a_causal_lm(tmp_path, make, message):
    base = tmp_path / "notlm"
    make(base)
    with pytest.raises(ConfigError, match=message):
        run_recipe(sft_recipe(tmp_path, base, lora=LORA))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, error, message", [
    ({"base": None}, ConfigError, "missing required key 'base'"),
    ({"model": {"preset": "lm-nano"}}, ConfigError, "model: the sft family takes its model from `base`"),
    ({"data": {"max_length": 4096}}, ConfigError, "data.max_length: 4096 is beyond the base model's context of 256"),
    ({"lora": {"target_modules": ["c_attn"]}}, ConfigError, "lora.target_modules: .* its linear layers are "
                                                            "down_proj, gate_proj, k_proj"),
    ({"lora": {"rank": 4}}, ConfigError, r"unknown key 'lora.rank' \(did you mean 'r'\?\)"),
    ({"data": {"max_length": 16}}, DataError, "no example keeps an assistant token within max_length 16"),
])
def test_recipe_errors(tmp_path, base_run, change, error, message):
    path = sft_recipe(tmp_path, base_run, lora=LORA)
    tree = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump({k: v for k, v in tree.items() if v is not None}))
    with pytest.raises(error, match=message):
        run_recipe(path)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, base_run, capsys):
    path = _jsonl(tmp_path, {"messages": [{"role": "user", "content": "hi"}]})
    assert main(["train", str(sft_recipe(tmp_path, base_run, dataset=str(path)))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:1: the conversation has no assistant turn") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_merge_errors(lora_run, tmp_path, capsys):
    _, _, run = lora_run
    with pytest.raises(RunError, match=r"has no adapter 'nope' \(adapters: sft\)"):
        merge_adapter(run.path, "nope", tmp_path / "m")
    other = tmp_path / "other"  # another architecture: wider
    _, tok = load_lm(run.model_dir)
    save_lm(create_lm(build_lm_config(from_dict(LMSpec, {**TINY, "hidden_size": 48}), tok)), tok, other)
    assert main(["merge", str(run.path), "--adapter", "sft", "--out", str(tmp_path / "m"),
                 "--base", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading bars)
    assert err.startswith(f"error: the adapter {run.adapters_dir / 'sft'} does not fit the base {other} "
                          f"(it was trained on {Path(run.read_recipe()['base']).resolve() / 'model'}): size mismatch")
    assert not (tmp_path / "m").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        merge_adapter(run.path, "sft", tmp_path / "full")


def test_eval_of_an_sft_run_says_it_has_no_token_dataset_and_generate_treats_it_as_an_lm(lora_run, capsys):
    _, _, run = lora_run
    assert main(["eval", str(run.path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained (sft) on" in err and "not on a token dataset folder" in err
    assert main(["generate", str(run.path), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
