"""`genforge generate RUN --prompt ...` for language models: the serving engine, on a terminal.

The same Engine as `genforge serve` runs the request(s), so the CLI and the API sample the same
way. Several samples (`--num-samples N`) are submitted together and batched; the first streams
to stdout token by token, the others print as they complete. With `--seed S`, sample i uses seed
S + i, so the same command prints the same text every time. With `--watermark KEY` (or the key
file / GENFORGE_WATERMARK_KEY) every sample carries the keyed green-list watermark that `genforge
detect text` finds; `--label-text` appends an explicit label to each sample.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from genforge.common.errors import GenforgeError
from genforge.models.sampling import SamplingParams
from genforge.models.watermark import TextWatermark
from genforge.serve.engine import Engine

# SamplingParams errors name the OpenAI field; a terminal user typed these flags.
_FLAGS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
          "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "stop": "--stop",
          "seed": "--seed", "prompt": "--prompt"}


def flag_error(e: GenforgeError) -> GenforgeError:
    flag = _FLAGS.get(e.param or "", e.param)
    msg = e.message.split(": ", 1)[1] if e.param and e.message.startswith(f"{e.param}: ") else e.message
    return GenforgeError(f"{flag}: {msg}", param=flag)


def build_params(*, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float,
                 repetition_penalty: float, stop: list[str] | None, seed: int | None,
                 num_samples: int) -> SamplingParams:
    """The request's SamplingParams, checked with errors that name the CLI flag."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise GenforgeError(f"--num-samples: must be at least 1, got {num_samples}", param="--num-samples")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenforgeError(f"--top-k: must be at least 1 (leave it out for no limit), got {top_k}",
                            param="--top-k")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed)
    try:
        params.validate()
    except GenforgeError as e:
        raise flag_error(e) from None
    return params


def generate_to_terminal(run: str, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
                         top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                         stop: list[str] | None = None, seed: int | None = None, num_samples: int = 1,
                         out: TextIO | None = None, watermark: TextWatermark | None = None,
                         label_text: str | None = None) -> list[str]:
    """Print the prompt and its continuation(s) as they are generated; return the continuations
    (with the label, when one is given)."""
    from dataclasses import replace

    from genforge.models.lm import load_lm

    out = out or sys.stdout
    params = build_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, stop=stop, seed=seed, num_samples=num_samples)
    params = replace(params, watermark=watermark)
    model, tokenizer = load_lm(run)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        if tokenizer.bos_token_id is None:
            raise GenforgeError("--prompt: the prompt is empty and the tokenizer has no BOS token to start from",
                                param="--prompt")
        prompt_ids = [tokenizer.bos_token_id]
    engine = Engine(model, tokenizer, max_batch_size=num_samples, max_queue=num_samples)
    try:
        params.validate(engine.max_model_len, len(prompt_ids))
    except GenforgeError as e:
        raise flag_error(e) from None
    texts: list[str] = []
    t0 = time.perf_counter()
    engine.start()
    try:
        streams = [engine.submit(prompt_ids, replace(params, seed=None if seed is None else seed + i))
                   for i in range(num_samples)]
        for i, stream in enumerate(streams):
            if num_samples > 1:
                out.write(("\n" if i else "") + f"--- sample {i + 1} ---\n")
            out.write(prompt)
            out.flush()
            parts = []
            for ev in stream:  # the first sample streams live; the others have run alongside it
                if ev.error:
                    raise GenforgeError(f"generation failed: {ev.error}")
                if ev.text:
                    parts.append(ev.text)
                    out.write(ev.text)
                    out.flush()
            if label_text:
                parts.append(label_text)
                out.write(label_text)
            out.write("\n")
            texts.append("".join(parts))
    finally:
        engine.shutdown(drain=False)
    dt = time.perf_counter() - t0
    tokens = sum(s.completion_tokens for s in streams)
    path = "fast path" if engine.fast_path else "batched HF forward" if engine.gen.batched else "HF forward"
    print(f"[{tokens} tokens in {dt:.2f} s, {tokens / max(dt, 1e-9):.0f} tok/s, {path}; finish: "
          f"{', '.join(s.finish_reason or '?' for s in streams)}"
          f"{f'; watermarked ({watermark.header()})' if watermark is not None else ''}]", file=sys.stderr)
    return texts
