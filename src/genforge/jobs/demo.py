"""`genforge demo`: the main job on built-in data, end to end in a few CPU minutes.

prepare builtin:pydoc -> train lm-tiny (schedule sized to the time budget) -> eval -> samples
-> runs/demo/report.md with the loss plot.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import yaml

from genforge.common.config import recipe_from_tree
from genforge.common.progress import console
from genforge.common.runs import RunDir, update_report
from genforge.data.tokens import prepare_text_dataset
from genforge.eval.lm import evaluate_run
from genforge.jobs.train import build_family, run_loaded_recipe
from genforge.models.generation import generate
from genforge.models.lm import load_lm
from genforge.models.sampling import SamplingParams
from genforge.train.loop import pick_device, to_device

PROMPTS = ["The with statement", "A list comprehension", "Exceptions are", "def "]


def _recipe_tree(out_dir: str, dataset: str) -> dict:
    """configs/lm-tiny.yaml from the checkout, renamed `demo`; the context halved to fit CPU minutes."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / "configs" / "lm-tiny.yaml").is_file():
            tree = yaml.safe_load((root / "configs" / "lm-tiny.yaml").read_text(encoding="utf-8"))
            break
    else:
        tree = {"family": "lm", "model": {"preset": "lm-tiny"}, "train": {"lr": 1e-3, "warmup_steps": 20}}
    tree.update(name="demo", dataset=dataset, out_dir=out_dir)
    tree["model"] = {**tree.get("model", {}), "context_length": 128}
    tree["train"] = {**tree.get("train", {}), "eval_every": 50, "checkpoint_every": 100, "warmup_steps": 20,
                     "lr": 2e-3}
    return tree


def _seconds_per_step(tree: dict, device: torch.device, probes: int = 3) -> float:
    """Time a few real training steps so the cosine schedule ends inside the time budget."""
    recipe = recipe_from_tree({**tree, "train": {**tree["train"], "max_steps": 1}})
    objective, data = build_family(recipe, device)
    opt = objective.optimizers(recipe.train)[0].optimizer
    times = []
    for i in range(probes + 1):
        t0 = time.perf_counter()
        loss, _ = objective.loss(to_device(data.train_batch(i), device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


def run_demo(out_dir: str = "runs", minutes: float = 4.0) -> dict:
    t_start = time.perf_counter()
    dataset = str(Path(out_dir) / "data" / "pydoc")
    if not (Path(dataset) / "stats.json").is_file():
        console.rule("1/4 prepare builtin:pydoc")
        stats = prepare_text_dataset("builtin:pydoc", dataset, tokenizer="byte-bpe", vocab_size=4096)
        console.print(f"{stats['documents']} documents, {stats['tokens']['train']:,} train / "
                      f"{stats['tokens']['val']:,} val tokens -> {dataset}")
    run_path = Path(out_dir) / "demo"
    if run_path.exists():
        shutil.rmtree(run_path)  # the demo owns runs/demo and starts it fresh each time

    console.rule("2/4 train lm-tiny")
    tree = _recipe_tree(out_dir, dataset)
    device = pick_device(tree["train"].get("device", "auto"))
    per_step = _seconds_per_step(tree, device)
    steps = max(20, int(minutes * 60 / (per_step * 1.1)))
    tree["train"].update(max_steps=steps, time_budget=minutes * 60)
    console.print(f"{per_step:.2f} s/step measured -> {steps} steps in ~{minutes:g} min")
    outcome = run_loaded_recipe(recipe_from_tree(tree))
    console.print(outcome.summary())

    console.rule("3/4 evaluate")
    metrics = evaluate_run(str(run_path))
    console.print(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    console.rule("4/4 samples")
    samples = write_samples(RunDir(run_path))
    total = time.perf_counter() - t_start
    console.print(f"\ndemo finished in {total / 60:.1f} min. Outputs:\n"
                  f"  report      {run_path / 'report.md'}\n  loss plot   {run_path / 'plots' / 'loss.png'}\n"
                  f"  model (HF)  {run_path / 'model'}\n  samples     {run_path / 'samples' / 'samples.md'}\n"
                  f"Try: genforge generate {run_path} --prompt 'The for statement' --seed 0\n"
                  f"     genforge serve {run_path}")
    return {"metrics": metrics, "samples": samples, "seconds": total}


def write_samples(run: RunDir, prompts: list[str] = PROMPTS, max_new_tokens: int = 60) -> list[dict]:
    model, tokenizer = load_lm(run.path)
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=i)
        text = "".join(ev.text for ev in generate(model, tokenizer, ids, params))
        rows.append({"prompt": prompt, "completion": text, "seed": i})
        console.print(f"[bold]{prompt}[/]{text}\n")
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    (run.samples_dir / "samples.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    body = "".join(f"**{r['prompt']}**\n\n```\n{r['prompt']}{r['completion']}\n```\n\n" for r in rows)
    (run.samples_dir / "samples.md").write_text(body, encoding="utf-8")
    update_report(run, "samples", "## Samples\n\ntemperature 0.8, top-p 0.95, seeds 0..3\n\n" + body)
    return rows
