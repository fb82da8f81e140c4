"""Language-model evaluation: validation loss, perplexity and bits per byte on the run's own data.

Bits per byte divides by the UTF-8 bytes of the text rather than by tokens, so models with
different tokenizers (char, BPE of any size) compare on one scale.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genforge.common.errors import RunError
from genforge.common.progress import progress_bar
from genforge.common.runs import RunDir, atomic_write_text, update_report
from genforge.data.tokens import TokenBatches, TokenDataset
from genforge.models.lm import context_length, load_lm


@torch.inference_mode()
def validation_loss(model, batches, total: int | None = None) -> tuple[float, int]:
    """Mean next-token loss (nats) and the number of predicted tokens."""
    nats, count = 0.0, 0
    with progress_bar(transient=True) as bar:
        task = bar.add_task("eval", total=total, info="")
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), batch["labels"].view(-1),
                                   reduction="sum")
            nats += float(loss)
            count += batch["labels"].numel()
            bar.update(task, advance=1, info=f"loss={nats / count:.4f}")
    return nats / max(count, 1), count


def validation_data(run_path: str | Path) -> tuple[RunDir, TokenDataset, str]:
    """The run, the token dataset it recorded (checked unchanged) and that dataset's path."""
    run = RunDir.open(run_path)
    recorded = run.read_recipe().get("_provenance", {}).get("dataset", {})
    recipe = run.read_recipe()
    data = recorded.get("path") or recipe.get("dataset")
    if recipe.get("family", "lm") != "lm" and not (data and Path(data).is_dir()):
        raise RunError(f"{run.path} was trained ({recipe.get('family')}) on {data}, not on a token dataset folder; "
                       "genforge eval measures perplexity on a token dataset's validation split, which this run "
                       "does not have (its own held-out figures are in its report.md)")
    if not recorded.get("path"):
        raise RunError(f"{run.path}: the run does not record its dataset; cannot find validation data")
    dataset = TokenDataset(recorded["path"])
    if recorded.get("content_hash") and dataset.content_hash != recorded["content_hash"]:
        raise RunError(f"the dataset at {recorded['path']} changed since {run.path} was trained "
                       f"(content hash differs); re-prepare it or evaluate on the original")
    return run, dataset, recorded["path"]


def evaluate_model(model, dataset: TokenDataset, max_batches: int | None = None, batch_size: int = 16) -> dict:
    """Validation loss, perplexity and bits per byte of `model` on the dataset's val split."""
    ctx = context_length(model)
    val = dataset.split("val")
    data = TokenBatches(dataset.split("train"), val, batch_size, min(ctx, len(val) - 1), seed=0)
    total = math.ceil((len(val) - 1) // min(ctx, len(val) - 1) / batch_size)
    t0 = time.perf_counter()
    loss, tokens = validation_loss(model, data.val_batches(max_batches), total if max_batches is None
                                   else min(total, max_batches))
    seconds = time.perf_counter() - t0
    stats = dataset.stats
    tokens_per_byte = stats["tokens"]["val"] / max(stats["bytes"]["val"], 1)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss * tokens_per_byte / math.log(2), "val_tokens": tokens, "eval_seconds": seconds}


def evaluate_run(run_path: str, max_batches: int | None = None, batch_size: int = 16) -> dict:
    run, dataset, data_path = validation_data(run_path)
    model, _ = load_lm(run.path)
    result = evaluate_model(model, dataset, max_batches, batch_size)
    loss, tokens = result["val_loss"], result["val_tokens"]
    atomic_write_text(run.path / "eval.json", json.dumps(result, indent=2))
    update_report(run, "evaluation", (
        "## Evaluation\n\n| metric | value |\n|---|---|\n"
        f"| validation loss (nats/token) | {loss:.4f} |\n| perplexity | {result['perplexity']:.2f} |\n"
        f"| bits per byte | {result['bits_per_byte']:.4f} |\n| validation tokens | {tokens:,} |\n"
        f"\nOn the validation split of `{data_path}` "
        f"({'all of it' if max_batches is None else f'first {max_batches} batches'}).\n"))
    return result


@torch.inference_mode()
def continuation_nll(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Mean next-token loss (nats) of each continuation's tokens given its prompt. Rows are
    right-padded in batches, so every real token keeps its position; the caller keeps each
    prompt + continuation within the model's context."""
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (prompt, answer) in enumerate(chunk):
            seq = prompt + answer
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            labels[r, len(prompt):len(seq)] = torch.tensor(answer)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:].to(device), reduction="none")
        counts = (labels[:, 1:] != -100).sum(1).clamp(min=1).to(device)
        out += [float(v) for v in nll.sum(1) / counts]
    return out


def continuation_perplexity(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """exp(mean next-token loss) of each continuation given its prompt: how likely the model finds
    an answer to a prompt (the synthetic-data filter's score)."""
    return [math.exp(min(v, 50.0)) for v in continuation_nll(model, pairs, batch_size)]
