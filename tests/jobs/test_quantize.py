"""genforge quantize: each method that runs on this CPU quantizes a tiny LM into a folder that eval and
serve load quantized; perplexity stays near the fp model's; unsupported methods and bad input are
one-line errors that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from genforge.cli import main
from genforge.common.errors import ConfigError, RunError
from genforge.eval.lm import evaluate_run
from genforge.jobs.quantize import quantize_run
from genforge.jobs.train import run_recipe
from genforge.models.generation import SamplingParams, generate
from genforge.models.llamacore import fast_path_unsupported
from genforge.models.lm import load_lm
from genforge.models.quantize import unsupported

CPU_METHODS = [m for m in ("int8-dynamic", "int8-weight", "int4-weight") if unsupported(m, "cpu") is None]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, char_dataset) -> Path:
    """An lm-nano run trained a few steps on the char-level docs set."""
    root = tmp_path_factory.mktemp("q")
    tree = {"name": "base", "family": "lm", "dataset": str(char_dataset), "out_dir": str(root),
            "model": {"preset": "lm-nano", "context_length": 64},
            "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "eval_every": 30,
                      "eval_batches": 1, "seed": 3}}
    (root / "base.yaml").write_text(yaml.safe_dump(tree))
    run_recipe(root / "base.yaml")
    return root / "base"


def test_int8_methods_run_on_this_cpu():
    assert {"int8-dynamic", "int8-weight"} <= set(CPU_METHODS)


@pytest.mark.parametrize("method", CPU_METHODS)
def test_quantized_folder_loads_generates_and_evaluates(lm_run, tmp_path, method):
    out = tmp_path / "q"
    r = quantize_run(lm_run, method, out, eval_batches=4, max_new_tokens=8)
    assert json.loads((out / "model" / "quantization.json").read_text())["method"] == method
    assert r["perplexity_quantized"] <= r["perplexity_fp"] * 1.05  # int8 costs little perplexity
    assert r["weights_bytes_quantized"] < 0.7 * r["weights_bytes_fp"]
    assert r["tokens_per_s_quantized"] > 0 and r["tokens_per_s_fp"] > 0
    report = (out / "report.md").read_text()
    assert method in report and "perplexity" in report and "tokens/s" in report

    model, tok = load_lm(out)  # the quantized model, not the fp weights it keeps on disk
    assert fast_path_unsupported(model).startswith("quantized weights")
    events = list(generate(model, tok, tok.encode("The "), SamplingParams(max_new_tokens=5, temperature=0,
                                                                          ignore_eos=True)))
    assert len(events) == 5 and events[-1].finish_reason == "length"

    ev = evaluate_run(str(out), max_batches=4)  # `genforge eval DIR` finds the run's validation data
    assert ev["perplexity"] == pytest.approx(r["perplexity_quantized"], rel=1e-4)


def test_served_quantized(lm_run, tmp_path):
    from genforge.serve.server import create_app

    quantize_run(lm_run, "int8-dynamic", tmp_path / "q", eval_batches=1, max_new_tokens=2)
    with TestClient(create_app(tmp_path / "q")) as client:  # dtype auto: int8-dynamic computes in fp32
        r = client.post("/v1/completions", json={"prompt": "The ", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    with pytest.raises(ConfigError, match="computes in float32"):
        load_lm(tmp_path / "q", dtype="bfloat16")


def test_a_method_the_device_cannot_run_is_an_error(lm_run, tmp_path):
    with pytest.raises(ConfigError, match="int8-dynamic cannot run on cuda: .*CPU only"):
        from genforge.models.quantize import check_method

        check_method("int8-dynamic", "cuda")
    if "int4-weight" not in CPU_METHODS:
        with pytest.raises(ConfigError, match="int4-weight cannot run on cpu: .*CUDA only"):
            quantize_run(lm_run, "int4-weight", tmp_path / "q4")
        assert not (tmp_path / "q4").exists()


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(lm_run, tmp_path, capsys):
    assert main(["quantize", str(lm_run), "--method", "int3", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --method 'int3': expected one of") and "\n" not in err
    assert main(["quantize", str(tmp_path / "nope"), "--method", "int8-weight", "--out", str(tmp_path / "b")]) == 2
    assert "model not found" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert main(["quantize", str(lm_run), "--method", "int8-weight", "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # no temp folder left behind


def test_a_failure_midway_leaves_nothing(lm_run, tmp_path, monkeypatch):
    import genforge.jobs.quantize as job

    def boom(*a, **k):
        raise RunError("disk went away")

    monkeypatch.setattr(job, "tokens_per_second", boom)
    with pytest.raises(RunError):
        quantize_run(lm_run, "int8-dynamic", tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_prints_the_figures(lm_run, tmp_path, capsys):
    assert main(["quantize", str(lm_run), "--method", "int8-dynamic", "--out", str(tmp_path / "q"),
                 "--eval-batches", "1", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "quantized model written to" in out and "perplexity_quantized" in out
