"""`genforge merge RUN --adapter NAME --out DIR`: fold a run's LoRA adapter into its base model and
write a plain Hugging Face folder (transformers loads it without peft; `genforge serve DIR`)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from genforge.common.errors import ConfigError, RunError
from genforge.common.runs import RunDir, atomic_dir
from genforge.models.lm import load_lm, resolve_chat_template, save_lm
from genforge.models.lora import adapter_base, load_adapter


def merge_adapter(run_path: str | Path, adapter: str, out: str | Path, base: str | Path | None = None) -> Path:
    """Merge adapters/<adapter>/ of `run_path` into `base` (default: the base the adapter records)."""
    run = RunDir.open(run_path)
    adapter_dir = run.adapters_dir / adapter
    if not (adapter_dir / "adapter_config.json").is_file():
        found = sorted(p.name for p in run.adapters_dir.iterdir()) if run.adapters_dir.is_dir() else []
        raise RunError(f"{run.path} has no adapter {adapter!r} (adapters: {', '.join(found) or 'none'})",
                       param="adapter")
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists; choose a new folder (a merge never overwrites)",
                          param="out")
    base_name = str(base or adapter_base(adapter_dir) or "")
    if not base_name:
        raise RunError(f"{adapter_dir}/adapter_config.json names no base model; give one with --base")
    try:
        model, tokenizer = load_lm(base_name)
    except RunError as e:
        raise RunError(f"the base of adapter {adapter!r} cannot be loaded ({e.message}); if it moved, "
                       "give it with --base") from None
    if (run.model_dir / "tokenizer_config.json").is_file():
        # the fine-tuned run's tokenizer carries the chat template the adapter was trained with
        tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    tokenizer.chat_template = resolve_chat_template(tokenizer)
    merged = load_adapter(model, adapter_dir, base_name).merge_and_unload()
    with atomic_dir(out) as tmp:
        save_lm(merged, tokenizer, tmp)
    return out
