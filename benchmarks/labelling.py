"""Labelling, text half: genforge's keyed green-list watermark measured on genforge's own LM.

    .venv/bin/python benchmarks/labelling.py [--steps 800] [--n 100] [--threads 1]
    .venv/bin/python benchmarks/labelling.py --quick      # a few seconds of everything: checks the script only

The model: lm-nano (~1M parameters, byte-level BPE 4096) trained here on the CPython docs corpus
(`builtin:pydoc`, genforge's first 90% train split) through `jobs.train.run_recipe`, cached in
CACHE/labelling. The labelled set, all continuing prompts / taken from the HELD-OUT validation split:

- watermarked: 16-token prompts from the val split continued by 200 tokens at temperature 0.8 with the
  watermark (gamma 0.25, delta 1 / 2 / 4; delta 2 is the default and the detection rows' setting);
- plain: the same prompts continued without it (negatives a detector must not flag);
- human: 200-token windows of the val split itself (negatives).

Every text is decoded and re-tokenised (without special tokens) before it is scored, as `genforge
detect text` sees it. `ignore_eos` keeps every continuation at 200 tokens. Reported:

1. detection rate against length (the first L tokens of each text): at the threshold that gives 1%
   false positives on the negatives (plain + human; its 99th percentile, so with N negatives the
   FPR estimate has N/100 samples behind it) and at the fixed z = 4 (with that threshold's measured FPR);
   the shortest length where detection reaches 95% at 1% FPR;
2. the perplexity cost: the perplexity of each delta's continuations under the same model WITHOUT the
   watermark (delta 0 = plain sampling), and detection at 64 tokens per delta;
3. robustness: 10%, 25%, 50% of the 200 tokens replaced by uniformly random tokens (in token ids);
4. throughput of the batching engine (serve/engine.py) with 16 concurrent rows x 128 tokens, with and
   without the watermark: each config in its own process, 3 processes each, the median;
5. the per-step cost of the bias alone for 16 rows, ours (one vectorised hash, per-row keys) against
   transformers' WatermarkLogitsProcessor (a torch.Generator seed + randperm per row and step), at
   this model's vocabulary and at 32k / 152k.

Writes benchmarks/results/labelling_text.json (labelling_text_quick.json with --quick) and prints the
markdown tables the README shows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, cpu_info, fmt, git_commit, md_table, median, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KEY = "labelling-benchmark-key"
PROMPT, NEW, TEMPERATURE, GAMMA = 16, 200, 0.8, 0.25
LENGTHS = (16, 32, 64, 128, 200)
DELTAS = (1.0, 2.0, 4.0)
EDITS = (0.10, 0.25, 0.50)


# -- the model and the held-out text ------------------------------------------------------------------
def ensure_model(work: Path, steps: int) -> tuple[Path, Path]:
    """(model folder, dataset folder): lm-nano trained `steps` steps on pydoc at context 256 (cached)."""
    from genforge.data.tokens import prepare_text_dataset
    from genforge.jobs.train import run_recipe

    data = work / "data-pydoc-4096"
    if not (data / "stats.json").is_file():
        prepare_text_dataset("builtin:pydoc", data, vocab_size=4096)
    run = work / "runs" / f"lm-nano-{steps}"
    if not (run / "model" / "config.json").is_file():
        print(f"training lm-nano for {steps} steps -> {run}", flush=True)
        run_recipe(ROOT / "configs" / "lm-nano.yaml", overrides=[
            f"dataset={data}", f"out_dir={work / 'runs'}", f"name=lm-nano-{steps}", "model.context_length=256",
            "train.batch_size=16", f"train.max_steps={steps}", "train.warmup_steps=20",
            f"train.eval_every={steps}", "train.eval_batches=8", "train.checkpoint_every=1000000",
            "train.log_every=100"])
    return run / "model", data


def val_windows(data: Path, n: int, length: int, seed: int) -> list[list[int]]:
    """n windows of `length` tokens from the val split (start points drawn with `seed`), none crossing an
    end-of-document token, so each is one person's running text."""
    from genforge.data.tokens import TokenDataset

    ds = TokenDataset(data)
    val = np.asarray(ds.split("val"), dtype=np.int64)
    eos = ds.tokenizer.eos_token_id
    rng = random.Random(seed)
    out: list[list[int]] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        s = rng.randrange(0, len(val) - length)
        w = val[s:s + length]
        if eos not in w:
            out.append(w.tolist())
    return out


# -- generation and scoring -----------------------------------------------------------------------------
def generate(model, tok, prompts: list[list[int]], delta: float | None, new: int) -> list[list[int]]:
    """Each prompt continued by `new` tokens, 32 rows at a time through the engine's decode step."""
    from genforge.models.generation import BatchGenerator
    from genforge.models.sampling import SamplingParams
    from genforge.models.watermark import TextWatermark

    wm = TextWatermark.from_secret(KEY, gamma=GAMMA, delta=delta) if delta else None
    gen = BatchGenerator(model, tok, max_batch_size=32)
    out = []
    for i in range(0, len(prompts), 32):
        seqs = [gen.new_sequence(p, SamplingParams(max_new_tokens=new, temperature=TEMPERATURE, seed=i + j,
                                                   ignore_eos=True, watermark=wm))
                for j, p in enumerate(prompts[i:i + 32])]
        gen.add(seqs)
        while gen.rows:
            gen.step()
        out += [s.tokens for s in seqs]
    return out


def retokenise(tok, ids: list[int]) -> list[int]:
    return list(tok(tok.decode(ids, skip_special_tokens=True), add_special_tokens=False)["input_ids"])


def zs(texts: list[list[int]], length: int) -> np.ndarray:
    from genforge.models.watermark import TextWatermark, score_ids

    wm = TextWatermark.from_secret(KEY, gamma=GAMMA)
    return np.array([score_ids(t[:length], wm, min_tokens=1).z_score for t in texts])


def threshold_1pct(negatives: np.ndarray) -> float:
    return float(np.quantile(negatives, 0.99, method="higher"))


@torch.no_grad()
def perplexity(model, prompts: list[list[int]], conts: list[list[int]]) -> float:
    """exp(mean NLL) of the continuations' tokens under `model` (no watermark), 16 sequences a batch."""
    nll, count = 0.0, 0
    for i in range(0, len(prompts), 16):
        seqs = [p + c for p, c in zip(prompts[i:i + 16], conts[i:i + 16])]
        x = torch.tensor(seqs)
        logp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
        picked = logp.gather(-1, x[:, 1:, None])[..., 0]
        nll -= picked[:, len(prompts[i]) - 1:].sum().item()
        count += picked[:, len(prompts[i]) - 1:].numel()
    return math.exp(nll / count)


def edit(ids: list[int], fraction: float, vocab: list[int], rng: random.Random) -> list[int]:
    out = list(ids)
    for pos in rng.sample(range(len(out)), round(fraction * len(out))):
        out[pos] = rng.choice(vocab)
    return out


# -- throughput: one child process per measurement ---------------------------------------------------------
CHILD_CONFIGS = ("plain", "watermarked", "watermarked_one_key")  # watermarked: a key per row


def throughput_child(folder: str, config: str, rows: int, new: int) -> dict:
    from genforge.models.lm import load_lm
    from genforge.models.sampling import SamplingParams
    from genforge.models.watermark import TextWatermark
    from genforge.serve.engine import Engine

    model, tok = load_lm(folder)
    engine = Engine(model, tok, max_batch_size=rows, max_queue=rows)
    engine.start()
    try:
        def once() -> float:
            params = [SamplingParams(max_new_tokens=new, temperature=TEMPERATURE, seed=i, ignore_eos=True,
                                     watermark=None if config == "plain" else TextWatermark.from_secret(
                                         "deployment" if config == "watermarked_one_key" else f"tenant-{i}"))
                      for i in range(rows)]  # a key per row (the multi-tenant case), or the deployment's one
            t0 = time.perf_counter()
            streams = [engine.submit([1 + i, 2 + i, 3 + i], p) for i, p in enumerate(params)]
            for s in streams:
                for _ in s:
                    pass
            return sum(s.completion_tokens for s in streams) / (time.perf_counter() - t0)

        once()  # warm-up
        return {"tokens_per_s": median([once() for _ in range(3)]), "fast_path": engine.fast_path}
    finally:
        engine.shutdown(drain=False)


def throughput(folder: Path, threads: int, rows: int, new: int, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    runs: dict[str, list[float]] = {name: [] for name in CHILD_CONFIGS}
    for _ in range(repeats):  # alternated, so drift in the machine's load hits both alike
        for name in runs:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--model", str(folder),
                                  "--threads", str(threads), "--rows", str(rows), "--child-new", str(new)],
                                 capture_output=True, text=True, env=env, timeout=900)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"])
    return {name: {"runs": v, "median_tokens_per_s": median(v)} for name, v in runs.items()}


def ensure_bigger_model(work: Path, tok, preset: str = "lm-tiny") -> Path:
    """A random-weight `preset` LM with lm-nano's tokenizer: throughput needs the shape, not training."""
    from genforge.common.config import from_dict
    from genforge.models.lm import LMSpec, build_lm_config, create_lm, save_lm

    path = work / f"{preset}-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        save_lm(create_lm(build_lm_config(from_dict(LMSpec, {"preset": preset}, "model"), tok)), tok, path)
    return path


def per_step_cost(vocabs: tuple[int, ...], rows: int = 16, calls: int = 30) -> list[dict]:
    """ms per decode step for the watermark bias alone (on a copy of the logits, as the sampler does):
    ours with one deployment key and with a key per row, vs transformers' processor (one key)."""
    from transformers import WatermarkLogitsProcessor

    from genforge.models.watermark import TextWatermark, add_green_bias

    one = [TextWatermark.from_secret("deployment")] * rows
    own = [TextWatermark.from_secret(f"k{i}") for i in range(rows)]
    idx = list(range(rows))

    def ours(scores: torch.Tensor, marks: list, prev: list[int]) -> torch.Tensor:
        out = scores.clone()
        add_green_bias(out, idx, marks, prev)
        return out

    out = []
    for vocab in vocabs:
        scores = torch.randn(rows, vocab)
        prev = torch.randint(0, vocab, (rows,)).tolist()
        hf = WatermarkLogitsProcessor(vocab_size=vocab, device="cpu", greenlist_ratio=GAMMA, bias=2.0)
        ids = torch.randint(0, vocab, (rows, 8))
        fns = {"genforge_ms": lambda s=scores, p=prev: ours(s, one, p),
               "genforge_key_per_row_ms": lambda s=scores, p=prev: ours(s, own, p),
               "transformers_ms": lambda s=scores, i=ids, h=hf: h(i, s)}
        row = {"vocab": vocab, "rows": rows}
        for name, fn in fns.items():
            fn()
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            row[name] = median(times)
        out.append(row)
    return out


def speed_tables(a: argparse.Namespace, folder: Path, tok) -> dict:
    """4. throughput on the trained lm-nano and on a random-weight lm-tiny (the cost is per step and
    fixed, so it shrinks as the model grows); 5. the bias alone per step."""
    from genforge.models.lm import count_parameters, load_lm

    print("throughput (each config in its own process) ...", flush=True)
    new, repeats = (32, 1) if a.quick else (128, 3)
    bigger = ensure_bigger_model(Path(a.work), tok)
    return {
        "throughput_16_rows": throughput(folder, a.threads, 16, new, repeats),
        "throughput_16_rows_lm_tiny": {"parameters": count_parameters(load_lm(bigger)[0]), "folder": str(bigger),
                                       "weights": "random (throughput depends on the shape only)",
                                       **throughput(bigger, a.threads, 16, new, repeats)},
        "per_step_bias_cost": per_step_cost((len(tok), 32_000, 151_936) if not a.quick else (len(tok),)),
        "speed_what_ran": {"git": git_commit(ROOT), "threads": a.threads, "cpu": cpu_info(),
                           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }


# -- the report ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=800, help="training steps of the LM")
    ap.add_argument("--n", type=int, default=100, help="texts per class (watermarked, plain, human)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(CACHE / "labelling"))
    ap.add_argument("--text-only", action="store_true", help="skip the image half (benchmarks/labelling_images.py)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="rerun only the throughput and per-step tables, into the existing JSON")
    ap.add_argument("--child", choices=CHILD_CONFIGS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--child-new", type=int, default=128, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(throughput_child(a.model, a.child, a.rows, a.child_new)))
        return
    steps, n, new = (60, 24, 64) if a.quick else (a.steps, a.n, NEW)
    lengths = tuple(L for L in LENGTHS if L <= new)
    started = time.time()
    from genforge.models.lm import count_parameters, load_lm

    folder, data = ensure_model(Path(a.work), steps)
    model, tok = load_lm(folder)
    if a.throughput_only:
        out = RESULTS / ("labelling_text_quick.json" if a.quick else "labelling_text.json")
        result = json.loads(out.read_text())
        result.update(speed_tables(a, folder, tok))
        out.write_text(json.dumps(result, indent=2) + "\n")
        print_tables(result, tuple(L for L in LENGTHS if L <= new))
        print(f"\nwrote {out}")
        return
    prompts = [w[:PROMPT] for w in val_windows(data, n, PROMPT, seed=1)]
    human = [retokenise(tok, w) for w in val_windows(data, n, new, seed=2)]

    print(f"generating {n} x {new} tokens per delta ...", flush=True)
    conts = {d: generate(model, tok, prompts, d or None, new) for d in (0.0, *DELTAS)}
    texts = {d: [retokenise(tok, c) for c in conts[d]] for d in conts}
    marked, plain = texts[2.0], texts[0.0]

    # 1. detection against length
    rows_len, thresholds = [], {}
    for L in range(8, new + 1, 8):
        neg = np.concatenate([zs(plain, L), zs(human, L)])
        thr = thresholds[L] = threshold_1pct(neg)
        pos = zs(marked, L)
        rows_len.append({"tokens": L, "threshold_1pct_fpr": thr, "tpr_at_1pct_fpr": float((pos > thr).mean()),
                         "tpr_at_z4": float((pos >= 4).mean()), "fpr_at_z4": float((neg >= 4).mean()),
                         "fpr_plain_at_z4": float((zs(plain, L) >= 4).mean()),
                         "fpr_human_at_z4": float((zs(human, L) >= 4).mean()),
                         "median_z_watermarked": float(np.median(pos)), "median_z_negatives": float(np.median(neg))})
    length_95 = next((r["tokens"] for r in rows_len if r["tpr_at_1pct_fpr"] >= 0.95), None)

    # 2. perplexity cost per delta
    rows_ppl = []
    for d in (0.0, *DELTAS):
        at = min(64, new)
        pos = zs(texts[d], at)
        thr = thresholds[at]
        rows_ppl.append({"delta": d, "perplexity": perplexity(model, prompts, conts[d]),
                         f"tpr_at_1pct_fpr_{at}_tokens": float((pos > thr).mean()) if d else None,
                         f"median_z_{at}_tokens": float(np.median(pos))})
    human_ppl = perplexity(model, [w[:PROMPT] for w in val_windows(data, n, PROMPT + new, seed=3)],
                           [w[PROMPT:] for w in val_windows(data, n, PROMPT + new, seed=3)])

    # 3. robustness to replaced tokens
    specials = set(tok.all_special_ids)
    vocab = [t for t in range(len(tok)) if t not in specials]
    rng = random.Random(0)
    full = [t[:new] for t in marked]
    rows_edit = []
    for frac in (0.0, *EDITS):
        edited = [edit(t, frac, vocab, rng) for t in full]
        pos = zs(edited, new)
        rows_edit.append({"replaced": frac, "tpr_at_1pct_fpr": float((pos > thresholds[new]).mean()),
                          "tpr_at_z4": float((pos >= 4).mean()), "median_z": float(np.median(pos))})


    result = {
        "what_ran": {"cpu": cpu_info(), "threads": a.threads, "versions": versions("torch", "transformers"),
                     "git": git_commit(ROOT), "quick": a.quick, "model": {"preset": "lm-nano", "steps": steps,
                     "parameters": count_parameters(model), "vocab": len(tok), "context": 256,
                     "corpus": "builtin:pydoc (val split held out)", "folder": str(folder)},
                     "settings": {"gamma": GAMMA, "delta_detection_rows": 2.0, "temperature": TEMPERATURE,
                                  "prompt_tokens": PROMPT, "new_tokens": new, "texts_per_class": n,
                                  "ignore_eos": True, "key": "a fixed benchmark key"},
                     "seconds": round(time.time() - started, 1)},
        "detection_vs_length": rows_len, "length_for_95pct_at_1pct_fpr": length_95,
        "perplexity": rows_ppl, "human_text_perplexity": human_ppl, "edits": rows_edit,
        **speed_tables(a, folder, tok),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("labelling_text_quick.json" if a.quick else "labelling_text.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result, lengths)
    print(f"\nwrote {out}")
    if not a.text_only:  # the image half, in its own process: its tables and labelling_images*.json
        print("\n## Images (benchmarks/labelling_images.py)\n", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("labelling_images.py")),
                        *(["--quick"] if a.quick else [])], check=True)


def print_tables(r: dict, lengths: tuple[int, ...]) -> None:
    by_len = {row["tokens"]: row for row in r["detection_vs_length"]}
    print("\n### Detection against length (gamma 0.25, delta 2)\n")
    print(md_table(["tokens", "detected at 1% FPR", "z threshold for 1% FPR", "detected at z=4", "FPR at z=4",
                    "median z (marked / negatives)"],
                   [[L, fmt(by_len[L]["tpr_at_1pct_fpr"], ".0%"), fmt(by_len[L]["threshold_1pct_fpr"], ".2f"),
                     fmt(by_len[L]["tpr_at_z4"], ".0%"), fmt(by_len[L]["fpr_at_z4"], ".1%"),
                     f"{by_len[L]['median_z_watermarked']:.1f} / {by_len[L]['median_z_negatives']:.1f}"]
                    for L in lengths if L in by_len]))
    print(f"\nshortest length with >= 95% detected at 1% FPR: {r['length_for_95pct_at_1pct_fpr']} tokens")
    print("\n### Perplexity cost (under the same model without the watermark)\n")
    k = next(key for key in r["perplexity"][0] if key.startswith("median_z_"))
    t = next(key for key in r["perplexity"][0] if key.startswith("tpr_at_"))
    print(md_table(["delta", "perplexity", f"detected at 1% FPR ({t.split('_')[-2]} tokens)", "median z"],
                   [[row["delta"] or "0 (plain)", fmt(row["perplexity"], ".2f"), fmt(row[t], ".0%"),
                     fmt(row[k], ".1f")] for row in r["perplexity"]]))
    print(f"\nheld-out human text under the same model: perplexity {r['human_text_perplexity']:.2f}")
    print("\n### Robustness: tokens replaced by random ones (delta 2, full length)\n")
    print(md_table(["replaced", "detected at 1% FPR", "detected at z=4", "median z"],
                   [[fmt(row["replaced"], ".0%"), fmt(row["tpr_at_1pct_fpr"], ".0%"), fmt(row["tpr_at_z4"], ".0%"),
                     fmt(row["median_z"], ".1f")] for row in r["edits"]]))
    print("\n### Throughput, batching engine, 16 rows, median of 3 processes (watermarked: a key per row; "
          "watermarked_one_key: the deployment key on every row)\n")
    rows = []
    for label, key in (("lm-nano (trained)", "throughput_16_rows"), ("lm-tiny (random weights)",
                                                                      "throughput_16_rows_lm_tiny")):
        tp = r.get(key)
        if not tp:
            continue
        base = tp["plain"]["median_tokens_per_s"]
        for name in CHILD_CONFIGS:
            v = tp[name]
            rows.append([label, name, fmt(v["median_tokens_per_s"], ".0f"),
                         f"{v['median_tokens_per_s'] / base - 1:+.1%}" if name != "plain" else "",
                         ", ".join(f"{x:.0f}" for x in v["runs"])])
    print(md_table(["model", "config", "tokens/s", "vs plain", "runs"], rows))
    print("\n### The bias alone per decode step, 16 rows\n")
    print(md_table(["vocabulary", "genforge, one key (ms)", "genforge, a key per row (ms)",
                    "transformers WatermarkLogitsProcessor, one key (ms)"],
                   [[row["vocab"], fmt(row["genforge_ms"], ".3f"), fmt(row.get("genforge_key_per_row_ms"), ".3f"),
                     fmt(row["transformers_ms"], ".3f")]
                    for row in r["per_step_bias_cost"]]))


if __name__ == "__main__":
    main()
