"""`genforge quantize RUN --method M --out DIR`: a quantized copy of a model that `genforge serve DIR`
and `genforge eval DIR` load, and a report of what quantization costs and saves on this machine.

For a genforge run, DIR is a run directory: recipe.yaml (the run's, plus how it was quantized),
model/ (the run's weights with quantization.json; see models/quantize.py for why the fp weights are
kept) and report.md, so `genforge eval DIR` finds the validation data the run recorded. For a Hugging
Face folder, DIR is a copy of it with quantization.json, and report.md beside the weights.

The report is measured on the model exactly as DIR loads (read back from it, not the in-memory copy):
perplexity on the run's validation split, the weights' size, and tokens/s of one short batched
greedy generation (models/generation.py) of the fp and the quantized model.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
import yaml

from genforge.common.errors import ConfigError, GenforgeError
from genforge.common.runs import RunDir, atomic_dir, atomic_write_text
from genforge.eval.lm import evaluate_model, validation_data
from genforge.models.generation import BatchGenerator, SamplingParams
from genforge.models.lm import load_lm, model_folder
from genforge.models.quantize import check_method, quantized_state_bytes, read_marker, write_marker

PROMPTS = ("The ", "def ", "import ", "class ")  # short enough for any tokenizer, char-level too


def tokens_per_second(model: torch.nn.Module, tokenizer, max_new_tokens: int, fast: bool | None = False) -> float:
    """Generated tokens per wall-clock second, the best of three runs: the PROMPTS decoded together,
    greedy, EOS ignored so every row runs `max_new_tokens`. `fast=False` runs the model's own forward (what a quantized
    model runs), None lets the generator pick (the Llama fast path for an fp Llama-style model)."""
    gen = BatchGenerator(model, tokenizer, max_batch_size=len(PROMPTS), fast=fast)
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def run(n: int) -> int:
        params = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        done, events = 0, gen.add([gen.new_sequence(ids, params) for ids in prompts])
        while True:
            done += sum(1 for _, ev in events if ev.token_id is not None)
            if not gen.rows:
                return done
            events = gen.step()

    run(max_new_tokens)  # the first run allocates and picks kernels (measured 30x slower here)
    best = 0.0
    for _ in range(3):  # the best of three: the machine may be shared
        t0 = time.perf_counter()
        n = run(max_new_tokens)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _perplexity(run_path: str | Path, models: list[torch.nn.Module], eval_batches: int | None) -> tuple[list, str]:
    """Each model's validation perplexity on the run's data, and where it came from (or why not)."""
    try:
        _, dataset, data_path = validation_data(run_path)
    except GenforgeError as e:
        return [None] * len(models), f"not measured: {e.message}"
    ppl = [evaluate_model(m, dataset, eval_batches)["perplexity"] for m in models]
    return ppl, (f"validation split of `{data_path}`" +
                 ("" if eval_batches is None else f", first {eval_batches} batches of 16"))


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def quantize_run(run_path: str | Path, method: str, out: str | Path, eval_batches: int | None = 20,
                 max_new_tokens: int = 32) -> dict:
    """Write the quantized copy of `run_path` (a run or an HF folder) to `out`; the report's figures."""
    check_method(method, "cpu")  # the job quantizes and measures on the CPU
    if eval_batches is not None and eval_batches < 1:
        raise ConfigError(f"--eval-batches {eval_batches}: must be at least 1", param="eval_batches")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1", param="max_new_tokens")
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists; choose a new folder (quantize never overwrites)",
                          param="out")
    source = model_folder(run_path)
    if read_marker(source):
        raise ConfigError(f"{source} is already quantized ({read_marker(source)}); quantize its source run",
                          param="run")
    is_run = (Path(run_path) / "recipe.yaml").is_file()
    fp_model, tokenizer = load_lm(run_path)
    record = {"method": method, "source": str(Path(run_path).resolve())}
    with atomic_dir(out) as tmp:
        model_dir = tmp / "model" if is_run else tmp
        shutil.copytree(source, model_dir, dirs_exist_ok=True)
        write_marker(model_dir, method, source=record["source"])
        if is_run:
            tree = RunDir(run_path).read_recipe()
            tree.setdefault("_provenance", {})["quantized"] = record
            atomic_write_text(tmp / "recipe.yaml", yaml.safe_dump(tree, sort_keys=False))
        q_model, _ = load_lm(tmp if is_run else model_dir)  # read back: what serve and eval will run
        (fp_ppl, q_ppl), ppl_source = (_perplexity(run_path, [fp_model, q_model], eval_batches) if is_run
                                       else ([None, None], "not measured: an HF folder records no validation data"))
        result = {
            "method": method, "out": str(out),
            "perplexity_fp": fp_ppl, "perplexity_quantized": q_ppl,
            "weights_bytes_fp": quantized_state_bytes(fp_model), "weights_bytes_quantized": quantized_state_bytes(q_model),
            "folder_bytes": sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()),
            "tokens_per_s_fp": tokens_per_second(fp_model, tokenizer, max_new_tokens),
            "tokens_per_s_quantized": tokens_per_second(q_model, tokenizer, max_new_tokens),
            "tokens_per_s_fp_fast_path": tokens_per_second(fp_model, tokenizer, max_new_tokens, fast=None),
        }
        atomic_write_text(tmp / "report.md", _report(result, run_path, ppl_source, max_new_tokens))
    return result


def _report(r: dict, run_path: str | Path, ppl_source: str, max_new_tokens: int) -> str:
    fp, q = r["perplexity_fp"], r["perplexity_quantized"]
    if fp is None:
        ppl_row = f"| perplexity | {ppl_source} | |"
    else:
        change = (q / fp - 1) * 100 if math.isfinite(fp) and fp > 0 else float("nan")
        ppl_row = f"| perplexity | {fp:.3f} | {q:.3f} ({change:+.2f}%) |"
    wf, wq = r["weights_bytes_fp"], r["weights_bytes_quantized"]
    tf, tq, tfast = r["tokens_per_s_fp"], r["tokens_per_s_quantized"], r["tokens_per_s_fp_fast_path"]
    return (
        f"# Quantized: {r['method']}\n\nFrom `{run_path}`, measured on this machine ({torch.get_num_threads()} "
        f"torch threads) on the model as this folder loads.\n\n"
        f"| | fp32 | {r['method']} |\n|---|---|---|\n{ppl_row}\n"
        f"| weights (state dict as torch.save writes it) | {_mib(wf)} | {_mib(wq)} ({wq / wf:.2f}x) |\n"
        f"| tokens/s, the model's own forward | {tf:.1f} | {tq:.1f} ({tq / tf:.2f}x) |\n"
        f"| tokens/s, genforge's Llama fast path (fp only) | {tfast:.1f} | |\n\n"
        f"Perplexity: {ppl_source}. Tokens/s: {len(PROMPTS)} prompts decoded together, greedy, "
        f"{max_new_tokens} tokens each, the best of three runs after a warm-up (wall clock). A quantized model "
        f"runs its own forward: the fast path fuses plain fp weights, so it serves fp models only.\n\n"
        f"On disk the folder holds the fp weights and `quantization.json` ({_mib(r['folder_bytes'])}); "
        f"every load re-applies {r['method']} to them (models/quantize.py says why).\n")
