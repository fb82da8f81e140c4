"""`genforge` command line: parse -> call -> print. Nothing else lives here.

Each subcommand imports its implementation lazily so `genforge --help` stays fast and a missing
optional extra only affects the command that needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from genforge.cli_args import (
    non_negative_float,
    positive_float,
    positive_int,
    run_family,
    trace_flag,
)
from genforge.cli_detect import add_watermark_flags
from genforge.cli_export import add_backend_flag
from genforge.common.errors import ConfigError, GenforgeError


def cmd_data_prepare(a: argparse.Namespace) -> None:
    if a.input.startswith("builtin:digits") or _is_image_input(a.input):
        from genforge.data.images import prepare_image_dataset

        stats = prepare_image_dataset(a.input, a.out, val_fraction=a.val_fraction, size=a.size, seed=a.seed,
                                      captions=a.captions)
    elif a.captions is not None:
        raise ConfigError(f"--captions is for a folder of images; {a.input} is not one")
    else:
        from genforge.data.tokens import prepare_text_dataset

        stats = prepare_text_dataset(a.input, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                                     val_fraction=a.val_fraction, field=a.field, doc_split=a.doc_split,
                                     min_chars=a.min_chars, max_chars=a.max_chars, seed=a.seed)
    print(f"dataset written to {a.out}")
    for k, v in stats.items():
        if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
            print(f"  {k}: " + ", ".join(f"{sk} {sv:,}" if isinstance(sv, int) else f"{sk} {sv}" for sk, sv in v.items()))
        elif not isinstance(v, (dict, list)):
            print(f"  {k}: {v}")


def cmd_data_synth(a: argparse.Namespace) -> None:
    from genforge.jobs.synth import synthesize

    stats = synthesize(a.teacher, a.prompts, a.out, n_per_prompt=a.n_per_prompt, max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, top_p=a.top_p, seed=a.seed, min_chars=a.min_chars,
                       max_chars=a.max_chars, max_perplexity=a.max_perplexity, batch_size=a.batch_size)
    print(f"{stats['written']} rows written to {a.out} (stats: {Path(a.out).stem}.stats.json beside it)")
    print("  " + ", ".join(f"{k} {stats[k]}" for k in ("prompts", "generated", "truncated", "duplicates",
                                                          "too_short", "too_long", "high_perplexity")))


def _is_image_input(path: str) -> bool:
    from genforge.data.images import looks_like_image_input

    return looks_like_image_input(path)


def cmd_train(a: argparse.Namespace) -> None:
    from genforge.common.tracing import setup_tracing
    from genforge.jobs.train import run_recipe

    if a.nproc is not None:
        _train_on_processes(a)
        return
    setup_tracing(a.trace)
    result = run_recipe(a.recipe, overrides=a.set, resume=a.resume)
    if result.main:
        print(result.summary())


def _train_on_processes(a: argparse.Namespace) -> None:
    """`--nproc N`: check the recipe here (one error line, not N), then hand the same command to torchrun,
    which starts N processes on this machine and a free port of its own (--standalone)."""
    import subprocess

    from genforge.common.config import load_recipe
    from genforge.common.errors import RunError
    from genforge.jobs.train import check_fresh
    from genforge.train.distributed import check

    recipe = load_recipe(a.recipe, a.set)
    check(recipe, a.nproc)
    check_fresh(recipe, a.resume)
    argv = ["train", a.recipe, *(x for kv in a.set for x in ("--set", kv)), "--trace", a.trace]
    if a.resume:
        argv.append("--resume")
    # torchrun's default is one thread per process; on a CPU, the cores are shared out instead
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // a.nproc)), **os.environ}
    code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(a.nproc), "-m", "genforge", *argv], env=env)
    if code:
        raise RunError(f"training on {a.nproc} processes failed (torchrun exited with code {code}); the "
                       "failing process's message is above")


def cmd_generate(a: argparse.Namespace) -> None:
    from genforge.cli_export import resolve_backend
    from genforge.models.text_to_image import is_text_to_image

    backend, exported = resolve_backend(a)  # exported: what an ONNX export holds (None for torch)
    if exported == "text-unet" or (exported is None and is_text_to_image(a.run)):
        _generate_from_text(a, backend)
        return
    for flag, value in (("--negative-prompt", a.negative_prompt), ("--init-image", a.init_image),
                        ("--strength", a.strength), ("--mask", a.mask)):
        if value is not None:
            raise GenforgeError(f"generate: {flag} is for text-to-image (latent-diffusion) runs only")
    if exported == "causal-lm" or (exported is None and run_family(a.run) == "lm"):
        if a.prompt is None:
            raise GenforgeError("generate: --prompt is required for a language model")
        if a.visible_label:
            raise GenforgeError("generate: --visible-label is for image runs; text takes --label-text")
        from genforge.cli_detect import watermark_from_args
        from genforge.jobs.onnxgen import generate_onnx_to_terminal
        from genforge.jobs.textgen import generate_to_terminal

        generate = generate_onnx_to_terminal if backend == "onnxruntime" else generate_to_terminal
        generate(a.run, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                 top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                 stop=a.stop, seed=a.seed, num_samples=a.num_samples, watermark=watermark_from_args(a),
                 label_text=a.label_text)
    else:
        from genforge.jobs.imagegen import generate_grid

        out = generate_grid(a.run, num_samples=a.num_samples, class_label=a.class_label, guidance=a.guidance,
                            steps=a.steps, sampler=a.sampler, seed=a.seed, out=a.out,
                            watermark=_image_watermark_key(a), visible_label=a.visible_label, backend=backend)
        print(f"wrote {out}")


def _image_watermark_key(a: argparse.Namespace) -> str | None:
    from genforge.data.image_labels import resolve_key

    for flag, value in (("--label-text", a.label_text), ("--watermark-gamma", a.watermark_gamma),
                        ("--watermark-delta", a.watermark_delta)):
        if value is not None:
            raise GenforgeError(f"generate: {flag} is for language models; image runs take --watermark KEY "
                                "(the invisible mark) and --visible-label")

    return resolve_key(a.watermark, a.watermark_key_file, flag="--watermark")


def _generate_from_text(a: argparse.Namespace, backend: str) -> None:
    if a.prompt is None:
        raise GenforgeError("generate: --prompt is required for a text-to-image run (\"\" for unconditional)")
    if a.class_label is not None:
        raise GenforgeError("generate: --class is for class-conditional runs; a text-to-image run takes --prompt")
    if a.sampler != "ddim":
        raise GenforgeError("generate: --sampler: a text-to-image run samples with its saved scheduler; leave it out")
    from genforge.jobs.imagegen_text import generate_from_text

    result = generate_from_text(a.run, a.prompt, negative_prompt=a.negative_prompt, num_samples=a.num_samples,
                                guidance=a.guidance, steps=a.steps, seed=a.seed, init_image=a.init_image,
                                strength=a.strength, mask=a.mask, out=a.out, watermark=_image_watermark_key(a),
                                visible_label=a.visible_label, backend=backend)
    print(f"wrote {result['grid']}")
    if result["edit"] is not None:
        print(f"wrote {result['edit']} (input | mask | outputs)")
    if "vae_round_trip_error" in result:
        print(f"unmasked pixels copied from the input; the VAE round trip there would have been "
              f"{result['vae_round_trip_error']:.2f} / 255 mean absolute error")


def cmd_merge(a: argparse.Namespace) -> None:
    from genforge.jobs.merge import merge_adapter

    out = merge_adapter(a.run, a.adapter, a.out, base=a.base)
    print(f"merged model written to {out}")


def cmd_quantize(a: argparse.Namespace) -> None:
    from genforge.jobs.quantize import quantize_run

    r = quantize_run(a.run, a.method, a.out, eval_batches=a.eval_batches, max_new_tokens=a.max_new_tokens)
    print(f"quantized model written to {r['out']} (report: {r['out']}/report.md)")
    for k, v in r.items():
        if k not in ("out", "method"):
            print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")


def cmd_demo(a: argparse.Namespace) -> None:
    if a.finetune:
        from genforge.jobs.demo_finetune import DPO, SFT, run_demo_finetune

        steps = a.steps or SFT["steps"]
        run_demo_finetune(out_dir=a.out_dir, sft={"steps": steps},
                          dpo={"steps": max(1, round(steps * DPO["steps"] / SFT["steps"]))})
        return
    from genforge.jobs.demo import run_demo

    run_demo(out_dir=a.out_dir, minutes=a.minutes)


def _served_model(a: argparse.Namespace) -> str:
    """MODEL (a folder) or --model (a folder or a registry reference NAME@REF): exactly one of them."""
    if (a.model is None) == (a.model_ref is None):
        raise ConfigError("serve: give the model once, as MODEL (a run or model folder) or --model "
                          "(a folder or a registry reference such as nano@production)", param="model")
    return a.model if a.model is not None else a.model_ref


def cmd_serve(a: argparse.Namespace) -> None:
    from genforge.cli_detect import watermark_from_args
    from genforge.common.registry import looks_like_ref
    from genforge.serve.adapters import parse_adapter_flags
    from genforge.serve.app_config import load_app_config
    from genforge.serve.options import parse_bytes, resolve_api_keys
    from genforge.serve.server import serve_forever

    alerts = {"enabled": a.alerts, "window": a.alert_window, "interval_s": a.alert_interval,
              "detector": a.alert_detector}
    app_config = load_app_config(a.config, cache=a.cache, rag=a.rag, guard=a.guard, store=a.store or a.state_dir,
                                 embedder=a.embedder, alerts=alerts)
    keys = resolve_api_keys(a.api_key, a.api_key_file, dict(os.environ))
    watermark = watermark_from_args(a)
    kv_bytes = parse_bytes(a.kv_cache_memory) if a.kv_cache_memory is not None else None
    adapters = parse_adapter_flags(a.adapter, a.adapters_dir)
    if a.upstream is not None:
        return _serve_upstream(a, app_config=app_config, api_keys=keys, watermark=watermark, adapters=adapters)
    if a.canary_upstream or a.shadow_upstream:
        raise ConfigError("--canary-upstream/--shadow-upstream: give the primary engine with --upstream URL",
                          param="upstream")
    model = _served_model(a)
    if looks_like_ref(model) or a.canary or a.shadow:
        from genforge.cli_registry import serve_from_registry

        return serve_from_registry(a, model, app_config=app_config, api_keys=keys, watermark=watermark,
                                   kv_cache_bytes=kv_bytes, adapters=adapters)
    from genforge.data.image_labels import ImageLabelling, VisibleLabel, resolve_key
    from genforge.data.image_watermark import InvisibleMark

    image_key = resolve_key(a.image_watermark, a.image_watermark_key_file, dict(os.environ), flag="--image-watermark")
    image_labelling = ImageLabelling(visible=VisibleLabel() if a.image_label else None,
                                     mark=InvisibleMark(image_key) if image_key else None)
    serve_forever(model, host=a.host, port=a.port, served_model_name=a.served_model_name,
                  max_model_len=a.max_model_len, dtype=a.dtype, max_batch_size=a.max_batch_size,
                  max_queue=a.max_queue, api_keys=keys, decode="eager" if a.enforce_eager else a.decode,
                  request_timeout=a.request_timeout or None, shutdown_timeout=a.shutdown_timeout,
                  limit_concurrency=a.limit_concurrency, header_timeout=a.header_timeout,
                  body_timeout=a.body_timeout, keep_alive=a.keep_alive, kv_cache_bytes=kv_bytes,
                  root_path=a.root_path, stream_interval=a.stream_interval, app_config=app_config,
                  http=a.http, loop=a.loop, adapters=adapters, max_loaded_adapters=a.max_loaded_adapters,
                  trace=a.trace, image_labelling=image_labelling, watermark=watermark, label_text=a.label_text)


def _serve_upstream(a: argparse.Namespace, *, app_config, api_keys, watermark, adapters) -> None:
    """`serve --upstream URL`: the request path in front of another engine; its engine flags are refused."""
    from genforge.serve.upstream_app import serve_upstream
    from genforge.serve.upstream_versions import check_url, parse_canary_upstream

    refused = [("MODEL", a.model is not None or a.model_ref is not None), ("--adapter/--adapters-dir", bool(adapters)),
               ("--watermark", watermark is not None), ("--decode/--enforce-eager",
                                                        a.decode != "prepacked" or a.enforce_eager),
               ("--kv-cache-memory", a.kv_cache_memory is not None), ("--canary/--shadow", bool(a.canary or a.shadow))]
    for flag, given in refused:
        if given:
            why = ("the upstream samples the tokens, so genforge cannot watermark them (use --label-text, or "
                   "the upstream's own watermarking)" if flag == "--watermark" else
                   "they name registry versions; use --canary-upstream URL=SHARE% / --shadow-upstream URL"
                   if flag == "--canary/--shadow" else "the upstream engine serves the model; this server runs none")
            raise ConfigError(f"{flag} with --upstream: {why}", param="upstream")
    canary = parse_canary_upstream(a.canary_upstream) if a.canary_upstream else None
    shadow = check_url(a.shadow_upstream, "--shadow-upstream") if a.shadow_upstream else None
    upstream_key = a.upstream_api_key or os.environ.get("GENFORGE_UPSTREAM_API_KEY") or None
    serve_upstream(a.upstream, host=a.host, port=a.port, shutdown_timeout=a.shutdown_timeout,
                   header_timeout=a.header_timeout, keep_alive=a.keep_alive, root_path=a.root_path, http=a.http,
                   loop=a.loop, trace=a.trace, limit_concurrency=a.limit_concurrency, api_key=upstream_key,
                   upstream_model=a.upstream_model, served_model_name=a.served_model_name, api_keys=api_keys,
                   body_timeout=a.body_timeout, request_timeout=a.request_timeout or None,
                   max_model_len=a.max_model_len, app_config=app_config, label_text=a.label_text, canary=canary,
                   shadow=shadow, shadow_log=a.shadow_log)


def cmd_anomaly(a: argparse.Namespace) -> None:
    from genforge.jobs.anomaly import score_images

    classes = [c.strip() for c in a.anomaly_classes.split(",")] if a.anomaly_classes else None
    result = score_images(a.run, a.images, out=a.out, anomaly_classes=classes, split=a.split)
    for k, v in result.items():
        print(f"{k}: {v}")


def cmd_augment(a: argparse.Namespace) -> None:
    from genforge.jobs.augment import augmentation_study

    result = augmentation_study(a.run, minority_class=a.minority_class, keep_fraction=a.keep_fraction,
                                seed=a.seed)
    for k, v in result.items():
        print(f"{k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genforge", description="data -> train -> eval -> serve for generative models")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset preparation").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="clean, tokenize and shard text, or index images")
    prep.add_argument("input", help="file, folder, builtin:pydoc, builtin:digits or builtin:digits-captions")
    prep.add_argument("--out", required=True)
    prep.add_argument("--tokenizer", choices=["byte-bpe", "char"], default="byte-bpe")
    prep.add_argument("--vocab-size", type=int, default=4096)
    prep.add_argument("--val-fraction", type=float, default=0.1)
    prep.add_argument("--field", help="text field of .jsonl/.csv/.parquet records")
    prep.add_argument("--doc-split", choices=["file", "paragraph", "line"], default=None,
                      help="how a .txt file splits into documents (default: paragraph)")
    prep.add_argument("--min-chars", type=int, default=1)
    prep.add_argument("--max-chars", type=int, default=None)
    prep.add_argument("--size", type=int, default=None, help="images: resize to SIZE x SIZE")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--captions", default=None, metavar="JSONL", help="images: a caption per image, one "
                      'line each: {"file": "relative/path.png", "caption": "..."} (or "captions": [...])')
    prep.set_defaults(func=cmd_data_prepare)
    sy = data.add_parser("synth", help="SFT conversations answered by a teacher model, deduplicated and filtered")
    sy.add_argument("--teacher", required=True, help="a run or HF model folder")
    sy.add_argument("--prompts", required=True, help=".jsonl with `prompt` or `messages`, or one prompt per line")
    sy.add_argument("--out", required=True, help="new .jsonl file of chat rows (stats beside it)")
    sy.add_argument("--n-per-prompt", type=positive_int, default=1, help="answers sampled per prompt")
    sy.add_argument("--max-new-tokens", type=positive_int, default=128)
    sy.add_argument("--temperature", type=float, default=0.8)
    sy.add_argument("--top-p", type=float, default=0.95)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--min-chars", type=int, default=1, help="drop answers shorter than this")
    sy.add_argument("--max-chars", type=int, default=None, help="drop answers longer than this")
    sy.add_argument("--max-perplexity", type=float, default=None,
                    help="drop answers the teacher itself finds less likely than this perplexity")
    sy.add_argument("--batch-size", type=positive_int, default=16, help="sequences generated together")
    sy.set_defaults(func=cmd_data_synth)

    tr = sub.add_parser("train", help="train a recipe through the one training loop")
    tr.add_argument("recipe")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    tr.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    tr.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                    help="train on N processes of this machine (torchrun: DDP, or FSDP with train.parallel: "
                    "fsdp); the recipe's batch_size is the global batch, split over them")
    trace_flag(tr, "data, step, eval and checkpoint")
    tr.set_defaults(func=cmd_train)

    ge = sub.add_parser("generate", help="generate text or images from a run")
    ge.add_argument("run")
    ge.add_argument("--prompt")
    ge.add_argument("--max-new-tokens", type=int, default=128)
    ge.add_argument("--temperature", type=float, default=0.8)
    ge.add_argument("--top-k", type=int, default=None)
    ge.add_argument("--top-p", type=float, default=1.0)
    ge.add_argument("--repetition-penalty", type=float, default=1.0)
    ge.add_argument("--stop", action="append", default=[])
    ge.add_argument("--seed", type=int, default=None)
    ge.add_argument("--num-samples", type=int, default=1)
    ge.add_argument("--class", dest="class_label", default=None, help="image runs: class name or index")
    ge.add_argument("--guidance", type=float, default=None)
    ge.add_argument("--steps", type=int, default=None)
    ge.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    ge.add_argument("--out", default=None, help="image runs: PNG grid path")
    ge.add_argument("--negative-prompt", default=None, help="text-to-image runs: what to steer away from")
    ge.add_argument("--init-image", default=None, metavar="IMG",
                    help="text-to-image runs: edit this image (image-to-image, or inpainting with --mask)")
    ge.add_argument("--strength", type=float, default=None,
                    help="with --init-image: how far from it, in (0, 1] (default 0.6; 1.0 with --mask)")
    ge.add_argument("--mask", default=None, metavar="MASK.png",
                    help="with --init-image: inpainting; white (or fully transparent) pixels are regenerated, "
                    "the rest kept exactly")
    add_watermark_flags(ge)  # --watermark / --watermark-key-file: the text mark for LMs, the invisible one for images
    ge.add_argument("--visible-label", action="store_true",
                    help="image runs: draw a visible 'AI-generated' label in a corner (>= 5%% of the shortest side)")
    add_backend_flag(ge)
    ge.set_defaults(func=cmd_generate)

    mg = sub.add_parser("merge", help="fold a run's LoRA adapter into its base: a plain Hugging Face folder")
    mg.add_argument("run")
    mg.add_argument("--adapter", required=True, help="the adapter's name (RUN/adapters/NAME)")
    mg.add_argument("--out", required=True, help="new folder for the merged model")
    mg.add_argument("--base", default=None, help="the base model (default: the one the adapter records)")
    mg.set_defaults(func=cmd_merge)

    qu = sub.add_parser("quantize", help="quantize a run's linear layers; a folder serve and eval load")
    qu.add_argument("run")
    qu.add_argument("--method", required=True, help="int8-dynamic (CPU), int8-weight, int4-weight (CUDA)")
    qu.add_argument("--out", required=True, help="new folder for the quantized model")
    qu.add_argument("--eval-batches", type=positive_int, default=20,
                    help="validation batches for the perplexity comparison")
    qu.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens per row of the speed test")
    qu.set_defaults(func=cmd_quantize)

    from genforge.cli_app import add_app_commands
    from genforge.cli_detect import add_detect_commands
    from genforge.cli_eval import add_eval_command
    from genforge.cli_export import add_export_command
    from genforge.cli_registry import add_registry_commands, add_serve_registry_flags
    from genforge.cli_runs import add_runs_commands

    add_app_commands(sub)
    add_detect_commands(sub)
    add_eval_command(sub)
    add_export_command(sub)
    add_runs_commands(sub)
    add_registry_commands(sub)

    de = sub.add_parser("demo", help="the main job on built-in data: prepare, train, eval, sample")
    de.add_argument("--out-dir", default="runs")
    de.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    de.add_argument("--finetune", action="store_true", help="from the pretrained demo (runs/demo): SFT then "
                    "DPO with LoRA, held-out ROUGE-L and preference accuracy before and after")
    de.add_argument("--steps", type=int, default=None,
                    help="--finetune: SFT steps (DPO's scale with them; default 150 and 80)")
    de.set_defaults(func=cmd_demo)

    se = sub.add_parser("serve", help="OpenAI-compatible HTTP API for a run or HF model folder")
    se.add_argument("model", nargs="?", default=None, help="a run directory or model folder")
    se.add_argument("--model", dest="model_ref", default=None, metavar="REF",
                    help="a folder, or a registry version: NAME@N, NAME@latest, NAME@ALIAS (see `genforge registry`)")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--served-model-name", default=None)
    se.add_argument("--max-model-len", type=positive_int, default=None,
                    help="context per sequence (default: the model's)")
    se.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    se.add_argument("--max-batch-size", type=positive_int, default=32, help="sequences decoded together")
    se.add_argument("--max-queue", type=positive_int, default=256,
                    help="sequences waiting for a batch slot (more: 503; one request's prompts x n above it: 400)")
    se.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                    help="memory budget of the KV cache, e.g. 512MiB, 2GiB or bytes")
    se.add_argument("--api-key", action="append", default=[],
                    help="accepted key (repeatable; visible in the process list: prefer --api-key-file)")
    se.add_argument("--api-key-file", default=None, metavar="PATH", help="file with one accepted key per line")
    se.add_argument("--root-path", default="", help="path prefix when served behind a proxy (ASGI root_path)")
    se.add_argument("--request-timeout", type=non_negative_float, default=600.0, metavar="SECONDS",
                    help="deadline per request from arrival, queue + generation (504 after it; 0 = none)")
    se.add_argument("--shutdown-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                    help="on SIGTERM, how long requests in flight may finish before they are cancelled")
    se.add_argument("--limit-concurrency", type=positive_int, default=None, metavar="N",
                    help="HTTP requests in flight at once (503 above; /health and /metrics exempt)")
    se.add_argument("--stream-interval", type=positive_int, default=1, metavar="N",
                    help="tokens per streamed chunk (1: every token; more: fewer socket writes per token)")
    se.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                    help="time for a request's headers to arrive")
    se.add_argument("--body-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                    help="time for a request's body to arrive")
    se.add_argument("--keep-alive", type=positive_float, default=5.0, metavar="SECONDS",
                    help="idle time before a keep-alive connection is closed")
    se.add_argument("--decode", choices=["prepacked", "eager", "compiled"], default="prepacked",
                    help="how the decode step runs: prepacked (default: eager with the weights kept once, in "
                    "oneDNN's prepacked layout, on CPU), eager (plain PyTorch), compiled (torch.compile with "
                    "frozen weights: fastest step, ~10-16 s more start-up, a second copy of the weights)")
    se.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                    help="HTTP protocol implementation (uvicorn's option; auto: httptools when installed)")
    se.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                    help="event loop (uvicorn's option; auto: uvloop when installed)")
    se.add_argument("--enforce-eager", action="store_true",
                    help="the same as --decode eager (vLLM's flag name)")
    trace_flag(se, "each request's steps (auth ... decode ... respond)")
    ad = se.add_argument_group("LoRA adapters over the model (each served under its name in `model`)")
    ad.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="a peft LoRA folder served as model NAME (repeatable)")
    ad.add_argument("--adapters-dir", default=None, metavar="DIR",
                    help="serve every adapter folder in DIR under its folder's name (e.g. RUN/adapters)")
    ad.add_argument("--max-loaded-adapters", type=positive_int, default=4, metavar="N",
                    help="adapters kept in memory; the others are read from disk when asked for, evicting the "
                    "least recently used idle one")
    ap = se.add_argument_group("application layer (each off unless turned on here or in --config)")
    ap.add_argument("--config", default=None, metavar="YAML", help="serve config file: store, embedder, cache, "
                    "rag, guard sections (the flags below override it)")
    ap.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                    help="semantic cache of deterministic chat requests")
    ap.add_argument("--rag", default=None, metavar="INDEX", help="answer chat requests from this index "
                    "(built by `genforge rag ingest`), with numbered citations and a `sources` field")
    ap.add_argument("--guard", choices=["off", "block", "redact", "log"], default=None,
                    help="input firewall (prompt injection, PII) and output PII/banned-pattern filter")
    ap.add_argument("--store", default=None, metavar="URL|DIR", help="postgresql://... shared by replicas, or a "
                    "folder for the embedded store (default: RUN/serve-state or ~/.cache/genforge/serve-state)")
    ap.add_argument("--state-dir", default=None, metavar="DIR", help="folder of the embedded store")
    ap.add_argument("--embedder", default=None, metavar="DIR",
                    help="a local sentence-transformers folder (default: all-MiniLM-L6-v2, shipped)")
    al = se.add_argument_group("alerts over the server's own metrics (also the `alerts:` section of --config)")
    al.add_argument("--alerts", action=argparse.BooleanOptionalAction, default=None,
                    help="sample throughput, TTFT, queue depth, error rate (cache hit rate) and flag anomalies as "
                    "genforge:anomaly{signal} and a log line (default: on)")
    al.add_argument("--alert-interval", type=positive_float, default=None, metavar="SECONDS",
                    help="seconds between samples (default 5)")
    al.add_argument("--alert-window", type=positive_int, default=None, metavar="N",
                    help="samples in the rolling window (default 60)")
    al.add_argument("--alert-detector", choices=["zscore", "iforest"], default=None,
                    help="robust z-score (default: measured the better one) or IsolationForest")
    up = se.add_argument_group("in front of another OpenAI-compatible engine (vLLM, TGI, llama.cpp, genforge)")
    up.add_argument("--upstream", default=None, metavar="URL",
                    help="forward requests to URL/v1/... instead of serving a model (auth, guard, cache, RAG, "
                    "labels, metrics and tracing run here)")
    up.add_argument("--upstream-api-key", default=None, metavar="KEY",
                    help="the upstream's API key (prefer GENFORGE_UPSTREAM_API_KEY: a flag shows in the process list)")
    up.add_argument("--upstream-model", default=None, metavar="NAME",
                    help="the model name sent upstream (default: the client's `model`)")
    up.add_argument("--canary-upstream", default=None, metavar="URL=SHARE%",
                    help="send SHARE percent of requests to a second engine, e.g. http://127.0.0.1:8001=10%% "
                    "(sticky per the x-genforge-route-key header, else the request's `user`; promote / roll back "
                    "with POST /admin/promote, /admin/rollback)")
    up.add_argument("--shadow-upstream", default=None, metavar="URL",
                    help="mirror every request to a second engine; its answers go to --shadow-log, never to clients")
    add_serve_registry_flags(se)
    add_watermark_flags(se)
    il = se.add_argument_group("image runs: labels on generated images (the AIGC metadata is always written)")
    il.add_argument("--image-label", action="store_true",
                    help="draw a visible 'AI-generated' label in a corner of every image (>= 5%% of the shortest side)")
    il.add_argument("--image-watermark", default=None, metavar="KEY",
                    help="embed the invisible keyed watermark in every image (prefer --image-watermark-key-file or "
                    "GENFORGE_IMAGE_WATERMARK_KEY: a flag shows in the process list)")
    il.add_argument("--image-watermark-key-file", default=None, metavar="PATH", help="file whose first line is the key")
    se.set_defaults(func=cmd_serve)

    an = sub.add_parser("anomaly", help="score images by a VAE run's reconstruction error / ELBO")
    an.add_argument("run")
    an.add_argument("images")
    an.add_argument("--out", default=None)
    an.add_argument("--anomaly-classes", default=None, help="comma-separated classes that count as anomalies "
                    "(default: the classes the VAE was not trained on)")
    an.add_argument("--split", choices=["train", "val", "all"], default="val", help="dataset folders: which split")
    an.set_defaults(func=cmd_anomaly)

    au = sub.add_parser("augment", help="minority-class oversampling study with a conditional model")
    au.add_argument("run")
    au.add_argument("--minority-class", required=True)
    au.add_argument("--keep-fraction", type=float, default=0.1)
    au.add_argument("--seed", type=int, default=0)
    au.set_defaults(func=cmd_augment)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        args.func(args)
    except GenforgeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
