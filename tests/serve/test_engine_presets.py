"""Model variety end to end: the state-space preset (lm-mamba-tiny, Mamba2) and the MoE preset
(lm-moe-tiny, Mixtral) train through the one loop from their shipped recipes (`genforge train
configs/...yaml`, shrunk with --set), save as HF folders, load, and serve through the batching
engine with concurrent requests: greedy outputs equal the model's own `generate`; the MoE preset
decodes on the batched fast path, the Mamba2 one in StateSpaceRunner's batched step."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from genforge.cli import main
from genforge.common.runs import RunDir
from genforge.models.fastdecode import LlamaRunner, StateSpaceRunner
from genforge.models.lm import load_lm
from genforge.serve.engine import Engine, SamplingParams

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TEXTS = ["The for statement", "x", "Built-in functions and the", "class A:\n    def"]


def train(tmp_path: Path, dataset: Path, recipe: str, *overrides: str) -> RunDir:
    """`genforge train configs/RECIPE` with tiny settings; the run directory."""
    sets = [f"dataset={dataset}", f"out_dir={tmp_path / 'runs'}", "model.context_length=64",
            "train.max_steps=40", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=5",
            "train.eval_every=10", "train.eval_batches=4", "train.checkpoint_every=40",
            "train.keep_last=1", "train.device=cpu", *overrides]
    args = ["train", str(CONFIGS / recipe)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    name = recipe.removesuffix(".yaml")
    return RunDir(tmp_path / "runs" / name)


def losses(run: RunDir, key: str) -> list[float]:
    return [r[key] for r in run.read_metrics() if key in r]


def serve_concurrently(engine: Engine, prompts: list[list[int]], new: list[int]) -> list[list[int]]:
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        params = SamplingParams(max_new_tokens=new[i], temperature=0, ignore_eos=True)
        results[i] = [e.token_id for e in engine.submit(prompts[i], params)]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return [results[i] for i in range(len(prompts))]


def reference(model, prompts: list[list[int]], new: list[int]) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False)[0, len(p):].tolist() for p, n in zip(prompts, new)]


def widest_batch(model) -> tuple[list[int], object]:
    """Record the batch size of every forward of `model` (a hook; remove it with the handle)."""
    sizes: list[int] = []
    handle = model.register_forward_hook(lambda m, args, kw, out: sizes.append(kw["input_ids"].shape[0]),
                                         with_kwargs=True)
    return sizes, handle


SHRINK = {  # the shipped recipes, made tiny for a test
    "lm-mamba-tiny.yaml": ["model.hidden_size=64", "model.num_layers=2", "model.state_size=16"],
    "lm-moe-tiny.yaml": ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
                         "model.num_kv_heads=2", "model.intermediate_size=96"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_dataset) -> dict[str, RunDir]:
    """Each preset trained once for this module (~5 s each), on first use."""
    runs: dict[str, RunDir] = {}

    def get(recipe: str) -> RunDir:
        if recipe not in runs:
            runs[recipe] = train(tmp_path_factory.mktemp(recipe.removesuffix(".yaml")), char_dataset, recipe,
                                 *SHRINK[recipe])
        return runs[recipe]
    return get


@pytest.mark.parametrize("recipe, arch", [("lm-mamba-tiny.yaml", "Mamba2ForCausalLM"),
                                          ("lm-moe-tiny.yaml", "MixtralForCausalLM")], ids=["mamba2", "moe"])
def test_preset_trains_through_the_loop_and_serves_batched(trained, recipe, arch):
    run = trained(recipe)
    val = losses(run, "val_loss")  # at steps 10, 20, 30, 40
    assert len(val) == 4 and all(b < a for a, b in zip(val, val[1:])), val  # it learned, on held-out text
    assert val[-1] < val[0] - 0.15, val
    assert type(AutoModelForCausalLM.from_pretrained(run.model_dir)).__name__ == arch

    model, tok = load_lm(run.path)
    prompts = [tok.encode(t) for t in TEXTS]
    new = [12, 9, 6, 10]
    expected = reference(model, prompts, new)
    # served as `genforge serve` does by default (prepacked weights), which releases the MoE model's
    # own attention weights: the reference above ran first
    with Engine(model, tok, max_batch_size=4, prepack=True) as engine:
        if arch == "MixtralForCausalLM":
            assert engine.fast_path and isinstance(engine.gen.runner, LlamaRunner)
            got = serve_concurrently(engine, prompts, new)
        else:
            assert not engine.fast_path and isinstance(engine.gen.runner, StateSpaceRunner)
            sizes, handle = widest_batch(model)
            try:
                got = serve_concurrently(engine, prompts, new)
            finally:
                handle.remove()
            assert max(sizes) > 1  # decode steps ran several rows in one forward
        assert engine.gen.batched
    assert got == expected


@pytest.mark.slow
def test_mamba_run_served_by_genforge_serve(trained, tmp_path):
    """A real `genforge serve` of the Mamba2 run: concurrent completions equal the model's greedy text."""
    import httpx

    from .conftest import MODEL_NAME
    from .processes import serving

    run = trained("lm-mamba-tiny.yaml")
    model, tok = load_lm(run.path)
    new = [12, 9, 6, 10]
    expected = [tok.decode(t, skip_special_tokens=True)
                for t in reference(model, [tok.encode(t) for t in TEXTS], new)]
    with serving(run.path, [], logs=tmp_path) as (server,):
        with httpx.Client(timeout=60) as client:
            def complete(i: int) -> str:
                body = {"model": MODEL_NAME, "prompt": TEXTS[i], "max_tokens": new[i], "temperature": 0,
                        "ignore_eos": True}
                r = client.post(server.v1 + "/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(TEXTS)) as pool:
                got = list(pool.map(complete, range(len(TEXTS))))
        log = server.log.read_text()
    assert got == expected
    assert "runner=StateSpaceRunner" in log and "batched=True" in log, log[-2000:]
