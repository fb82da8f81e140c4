"""`genforge eval`: a run's validation split, or a suite of prompts (text metrics, LLM-as-a-judge).

Kept apart from cli.py, like cli_app.py and cli_runs.py; `build_parser` there calls `add_eval_command`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from genforge.cli_args import positive_int, run_family
from genforge.common.errors import ConfigError


def cmd_eval(a: argparse.Namespace) -> None:
    if a.suite is not None:
        return cmd_eval_suite(a)
    if a.compare is not None:
        raise ConfigError("--compare scores two runs on a suite: give the suite with --suite FILE.jsonl",
                          param="compare")
    family = run_family(a.run)
    if family == "lm":
        from genforge.eval.lm import evaluate_run

        result = evaluate_run(a.run, max_batches=a.max_batches)
    elif family == "latent-diffusion":
        from genforge.jobs.text_image_eval import evaluate_text_image_run

        result = evaluate_text_image_run(a.run, num_fid=min(a.num_samples, 300))
    else:
        from genforge.jobs.image_eval import evaluate_image_run

        result = evaluate_image_run(a.run, num_samples=a.num_samples)
    for k, v in result.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


def cmd_eval_suite(a: argparse.Namespace) -> None:
    from rich.console import Console

    from genforge.eval.suite import Settings
    from genforge.eval.suite_report import evaluate_suite, summary_table

    for path in (a.run, a.compare):
        if path is not None and (family := run_family(path)) != "lm":
            raise ConfigError(f"--suite evaluates language models; {path} is a {family} run", param="suite")
    settings = Settings(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                        batch_size=a.batch_size)
    judge = _judge_config(a)
    rag = _rag_settings(a)
    if a.judge_only:
        if judge is None:
            raise ConfigError("--judge-only judges a suite's saved answers: give --judge-url and --judge-model",
                              param="judge_only")
        from genforge.eval.suite import load_suite

        name = load_suite(a.suite)[0] + (f"-rag-{re.sub(r'[^A-Za-z0-9._-]+', '-', rag.index)}" if rag else "")
        results_dir = Path(a.out or Path(a.run) / "eval") / name
    else:
        summary = evaluate_suite(a.run, a.suite, compare=a.compare, out=a.out, settings=settings, rag=rag)
        Console(soft_wrap=True).print(summary_table(summary))
        print(f"results: {summary['results_dir']}")
        results_dir = Path(summary["results_dir"])
    if judge is not None:
        from genforge.eval.judge_suite import judge_suite_results

        report_run = a.run if a.out is None and (Path(a.run) / "recipe.yaml").is_file() else None
        _, markdown = judge_suite_results(results_dir, judge, a.judge_mode, names=(a.run, a.compare or "B"),
                                          report_run=report_run)
        print(markdown)
        print(f"judgments: {results_dir / 'judgments.jsonl'}")


def _rag_settings(a: argparse.Namespace):
    """The RagSettings the --rag* options describe, or None without --rag."""
    if a.rag is None:
        if a.rag_store is not None or a.rag_mode is not None:
            raise ConfigError("--rag-store and --rag-mode need --rag INDEX (the index to retrieve from)", param="rag")
        return None
    from genforge.eval.rag import RagSettings
    from genforge.serve.app_config import default_state_dir

    return RagSettings(index=a.rag, store=a.rag_store or str(default_state_dir()), k=a.rag_k, mode=a.rag_mode)


def _judge_config(a: argparse.Namespace):
    """The JudgeConfig the --judge-* options describe, or None without --judge-url."""
    if a.judge_url is None:
        if a.judge_model is not None:
            raise ConfigError("--judge-model needs --judge-url (the judge's OpenAI-compatible base URL)",
                              param="judge_url")
        if given := [flag for flag, v in (("--judge-rubric", a.judge_rubric), ("--judge-pairwise-rubric",
                     a.judge_pairwise_rubric)) if v is not None]:
            raise ConfigError(f"{given[0]} is for the judge: give --judge-url and --judge-model too", param="judge_url")
        return None
    if a.judge_model is None:
        raise ConfigError("--judge-url needs --judge-model (the model name the judge serves)", param="judge_model")
    from genforge.eval.judge import JudgeConfig

    return JudgeConfig(url=a.judge_url, model=a.judge_model, key_env=a.judge_key_env, repeats=a.judge_repeats,
                       concurrency=a.judge_concurrency, timeout=a.judge_timeout, retries=a.judge_retries,
                       temperature=a.judge_temperature, max_tokens=a.judge_max_tokens,
                       response_format=a.judge_response_format, **_rubric_options(a))


def _rubric_options(a: argparse.Namespace) -> dict:
    """JudgeConfig fields from --judge-rubric, --judge-pairwise-rubric, --judge-scores, --[no-]judge-system-rubric
    (only those given: the rest keep JudgeConfig's defaults)."""
    from genforge.eval.judge import load_rubric

    options: dict = {"score_range": a.judge_scores}
    if a.judge_rubric is not None:
        options["pointwise_rubric"] = load_rubric(a.judge_rubric, "--judge-rubric")
    if a.judge_pairwise_rubric is not None:
        options["pairwise_rubric"] = load_rubric(a.judge_pairwise_rubric, "--judge-pairwise-rubric")
    if a.judge_system_rubric is not None:
        options["system_rubric"] = a.judge_system_rubric
    return options


def score_range(text: str) -> tuple[int, int]:
    """'1-5' -> (1, 5): the integer scores a pointwise rubric asks for, low < high."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score range: give LOW-HIGH, e.g. 1-5")
    low, high = int(match[1]), int(match[2])
    if low >= high:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty score range: give LOW-HIGH with LOW < HIGH")
    return low, high


def add_eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run on the validation split it recorded, or on a suite")
    ev.add_argument("run", help="a run directory, or (with --suite) any HF causal-LM folder")
    ev.add_argument("--max-batches", type=int, default=None)
    ev.add_argument("--num-samples", type=int, default=500, help="image runs: samples for FID/KID")
    su = ev.add_argument_group("suites: answer prompts and score them against references (BLEU, chrF, ROUGE, "
                               "exact match, reference perplexity)")
    su.add_argument("--suite", default=None, metavar="FILE.jsonl", help="one JSON object a line: prompt (or chat "
                    "messages), reference, optional labels; or builtin:pydoc-qa")
    su.add_argument("--compare", default=None, metavar="OTHER_RUN", help="answer the same items with this run "
                    "or model folder too, and report both side by side")
    su.add_argument("--out", default=None, metavar="DIR", help="where the results go (default RUN/eval; "
                    "required when RUN is a model folder, not a run)")
    su.add_argument("--max-new-tokens", type=positive_int, default=128)
    su.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    su.add_argument("--top-p", type=float, default=1.0)
    su.add_argument("--seed", type=int, default=0, help="sampling seed (item i uses seed + i)")
    su.add_argument("--batch-size", type=positive_int, default=32, help="answers generated at once")
    rg = ev.add_argument_group("retrieval: answer with sources from an index, as `genforge serve --rag` does, and "
                               "score the retrieval (items labelled with their `source` or pydoc `topic`)")
    rg.add_argument("--rag", default=None, metavar="INDEX", help="an index built by `genforge rag ingest`")
    rg.add_argument("--rag-store", default=None, metavar="STORE", help="postgresql://... or a folder (default: "
                    "~/.cache/genforge/serve-state, as genforge rag and serve)")
    rg.add_argument("--rag-k", type=positive_int, default=4, help="sources retrieved per question (as serve's rag.k)")
    rg.add_argument("--rag-mode", choices=["dense", "bm25", "hybrid"], default=None,
                    help="default: the mode `genforge rag eval` measured best for the index")
    ju = ev.add_argument_group("LLM-as-a-judge over a suite's answers (any OpenAI-compatible endpoint)")
    ju.add_argument("--judge-url", default=None, help="the judge's base URL, e.g. http://127.0.0.1:8000/v1")
    ju.add_argument("--judge-model", default=None, help="the model name the judge serves")
    ju.add_argument("--judge-key-env", default="GENFORGE_JUDGE_API_KEY", metavar="VAR",
                    help="environment variable holding the judge's API key (never a key on the command line)")
    ju.add_argument("--judge-mode", choices=["pointwise", "pairwise", "both", "faithfulness"], default=None,
                    help="pointwise scores, pairwise A/B in both orders, both, or faithfulness only "
                         "(default: both with --compare, else pointwise; answers made with --rag are also judged "
                         "for faithfulness: supported claims / claims)")
    ju.add_argument("--judge-repeats", type=positive_int, default=3, help="judgments per item (spread reported)")
    ju.add_argument("--judge-concurrency", type=positive_int, default=4, help="requests in flight at once")
    ju.add_argument("--judge-timeout", type=float, default=60.0, help="seconds for one judge request")
    ju.add_argument("--judge-retries", type=int, default=4, help="retries of a failed request (backoff doubles)")
    ju.add_argument("--judge-temperature", type=float, default=0.7)
    ju.add_argument("--judge-max-tokens", type=positive_int, default=128)
    ju.add_argument("--judge-response-format", choices=["json_schema", "json_object", "none"], default="json_schema",
                    help="how strict JSON is asked for (json_schema: OpenAI Structured Outputs)")
    ju.add_argument("--judge-rubric", default=None, metavar="FILE",
                    help="your own pointwise rubric (a text file) instead of the built-in 1-10 one; end it by asking "
                         'for {"score": <integer>, "reason": "..."} and give its scale with --judge-scores')
    ju.add_argument("--judge-pairwise-rubric", default=None, metavar="FILE",
                    help='your own pairwise rubric (a text file); end it by asking for {"winner": "A" | "B" | '
                         '"tie", "reason": "..."}')
    ju.add_argument("--judge-scores", type=score_range, default=(1, 10), metavar="LOW-HIGH",
                    help="the integer scores the pointwise rubric asks for (default 1-10); a score outside them "
                         "is rejected, never clipped")
    ju.add_argument("--judge-system-rubric", action=argparse.BooleanOptionalAction, default=None,
                    help="send the rubric as a system turn (the default) or, with --no-judge-system-rubric, at the "
                         "head of the user turn (chat templates without a system role; small contexts)")
    ju.add_argument("--judge-only", action="store_true",
                    help="judge the answers already saved for this suite (no generation)")
    ev.set_defaults(func=cmd_eval)

