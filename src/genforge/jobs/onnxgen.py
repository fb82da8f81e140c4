"""`genforge generate RUN --backend onnxruntime --prompt ...` (or `generate EXPORT_DIR ...`) for a language
model: the exported graph on onnxruntime, decoding token by token over its KV cache.

The same flags as the PyTorch path and the same sampler (models/sampling.py): with `--seed S` sample i uses
seed S + i, greedy and sampled text alike; `--watermark` marks the text as the PyTorch path does. Samples
run one after another (batch 1: the exported graph takes a batch, but rows of different lengths would
need padding this loop does not do).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from genforge.common.errors import GenforgeError
from genforge.jobs.textgen import build_params, flag_error
from genforge.models.onnx_runtime import OrtCausalLM, find_export, generate_onnx
from genforge.models.watermark import TextWatermark


def generate_onnx_to_terminal(run: str | Path, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
                              top_k: int | None = None, top_p: float = 1.0, repetition_penalty: float = 1.0,
                              stop: list[str] | None = None, seed: int | None = None, num_samples: int = 1,
                              out: TextIO | None = None, watermark: TextWatermark | None = None,
                              label_text: str | None = None) -> list[str]:
    """Print the prompt and each continuation as it is generated; return the continuations."""
    out = out or sys.stdout
    params = build_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, stop=stop, seed=seed, num_samples=num_samples)
    params = replace(params, watermark=watermark)
    lm = OrtCausalLM(find_export(run))
    prompt_ids = list(lm.tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        if lm.tokenizer.bos_token_id is None:
            raise GenforgeError("--prompt: the prompt is empty and the tokenizer has no BOS token to start from",
                                param="--prompt")
        prompt_ids = [lm.tokenizer.bos_token_id]
    try:
        params.validate(lm.max_model_len, len(prompt_ids))
    except GenforgeError as e:
        raise flag_error(e) from None
    texts, tokens, reasons = [], 0, []
    t0 = time.perf_counter()
    for i in range(num_samples):
        if num_samples > 1:
            out.write(("\n" if i else "") + f"--- sample {i + 1} ---\n")
        out.write(prompt)
        out.flush()
        parts = []
        for event in generate_onnx(lm, prompt_ids, replace(params, seed=None if seed is None else seed + i)):
            tokens += 1
            if event.text:
                parts.append(event.text)
                out.write(event.text)
                out.flush()
            if event.finish_reason is not None:
                reasons.append(event.finish_reason)
        if label_text:
            parts.append(label_text)
            out.write(label_text)
        out.write("\n")
        texts.append("".join(parts))
    dt = time.perf_counter() - t0
    quant = lm.record.get("quantization") or "fp32"
    print(f"[{tokens} tokens in {dt:.2f} s, {tokens / max(dt, 1e-9):.0f} tok/s, onnxruntime {quant}, "
          f"{lm.session.get_session_options().intra_op_num_threads} threads; finish: {', '.join(reasons)}"
          f"{f'; watermarked ({watermark.header()})' if watermark is not None else ''}]", file=sys.stderr)
    return texts
