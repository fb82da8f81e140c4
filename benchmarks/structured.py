"""What structured output costs: tokens/s of grammar-constrained vs free decoding, in the engine's loop.

    .venv/bin/python benchmarks/structured.py [--preset lm-nano] [--batch 16] [--tokens 96] [--rounds 3]
    .venv/bin/python benchmarks/structured.py --quick        # one short round: checks the script

Rows (same model, same BatchGenerator loop that `genforge serve` runs, `--batch` rows, sampled at
temperature 1 with a seed each, timed by wall clock over a whole batch):
  free               no grammar; EOS ignored, `--tokens` tokens a row
  json_schema        every row under {"answer": string (maxLength large), "score": integer 1..10}
                     (models/grammar.py: one llguidance mask a row a step, applied before sampling)
  half / half        half the rows free, half constrained: the mixed batch a judge shares with chat
The model: `--preset` with random weights and a 4096-token byte-BPE tokenizer trained on the built-in
pydoc corpus (the speed of a step does not depend on the weights' values; a random model's string is
long, so constrained rows run about as long as free ones; their tokens are counted as generated).
Writes benchmarks/results/structured.json (structured_quick.json with --quick) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_info, fmt, git_commit, md_table, median, versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "score"],
          "properties": {"answer": {"type": "string", "maxLength": 400},
                         "score": {"type": "integer", "minimum": 1, "maximum": 10}}}


def build(preset: str):
    import torch

    from genforge.data.text import load_documents
    from genforge.data.tokenizer import train_tokenizer
    from genforge.models.lm import LMSpec, build_lm_config, create_lm

    tok = train_tokenizer(load_documents("builtin:pydoc"), "byte-bpe", 4096)
    torch.manual_seed(0)
    return create_lm(build_lm_config(LMSpec(preset=preset), tok)).eval(), tok


def run_batch(gen, tok, grammar, batch: int, tokens: int, constrained: int, seed: int) -> tuple[int, float]:
    """Generated tokens and wall seconds of one batch, `constrained` of its rows under `grammar`."""
    from genforge.models.sampling import SamplingParams

    prompt = tok.encode("Rate the answer and explain:")
    seqs = [gen.new_sequence(prompt, SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=seed + i,
                                                    ignore_eos=i >= constrained,
                                                    grammar=grammar if i < constrained else None))
            for i in range(batch)]
    t0 = time.perf_counter()
    gen.add(seqs)
    while gen.rows:
        gen.step()
    return sum(len(s.tokens) for s in seqs), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lm-nano")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.tokens, args.rounds = 4, 24, 1

    import torch

    from genforge.models.generation import BatchGenerator
    from genforge.models.grammar import Grammar, grammar_tokenizer

    torch.set_num_threads(1)
    model, tok = build(args.preset)
    gen = BatchGenerator(model, tok, max_batch_size=args.batch)
    t0 = time.perf_counter()
    lltok = grammar_tokenizer(tok, gen.vocab_size, gen.eos_ids)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = Grammar.json_schema(SCHEMA, lltok)
    compile_s = time.perf_counter() - t0
    contenders = {"free": 0, "json_schema": args.batch, "half / half": args.batch // 2}
    run_batch(gen, tok, grammar, args.batch, 8, args.batch // 2, 0)  # warm-up: first-call costs
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        order = list(contenders)[r % len(contenders):] + list(contenders)[:r % len(contenders)]
        for name in order:
            n, secs = run_batch(gen, tok, grammar, args.batch, args.tokens, contenders[name], 1000 * r)
            runs[name].append({"tokens": n, "seconds": secs, "tokens_per_s": n / secs})
            print(f"round {r + 1} {name}: {n} tokens in {secs:.2f} s", flush=True)
    free = median([x["tokens_per_s"] for x in runs["free"]])
    rows = []
    for name, xs in runs.items():
        tps = median([x["tokens_per_s"] for x in xs])
        rows.append([name, fmt(median([x["tokens"] for x in xs])), fmt(tps), fmt(tps / free, ".2f")])
    table = md_table(["rows", "tokens", "tokens/s", "vs free"], rows)
    print(f"\n{args.preset}, batch {args.batch}, {args.tokens} tokens max, one thread, median of {args.rounds}; "
          f"grammar tokenizer {tokenizer_s * 1000:.0f} ms, schema compile {compile_s * 1000:.1f} ms\n")
    print(table)
    out = RESULTS / ("structured_quick.json" if args.quick else "structured.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": vars(args), "schema": SCHEMA, "tokenizer_seconds": tokenizer_s,
                               "compile_seconds": compile_s, "runs": runs, "table": table,
                               "fast_path": gen.fast_path, "cpu": cpu_info(),
                               "versions": versions("torch", "llguidance", "transformers"),
                               "commit": git_commit(ROOT)}, indent=2))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
