"""LoRA (and DoRA) adapters on causal LMs, through peft.

An adapter is saved in peft's format (adapter_config.json + adapter_model.safetensors), so
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)` loads it
anywhere; adapter_config.json names the base folder it was trained on.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import Field
from transformers import PreTrainedModel

from genforge.common.config import Spec, rng
from genforge.common.errors import ConfigError, RunError


class LoraSpec(Spec):
    """The recipe's `lora:` section for an LM: no section = full fine-tuning."""

    r: int = rng(8, min=1, max=1024, help="rank of the update matrices")
    alpha: float = rng(16.0, min=0, min_exclusive=True, help="scale: the update is multiplied by alpha / r")
    dropout: float = rng(0.05, min=0, max=0.9)
    target_modules: list[str] | str = Field("all-linear", description="module names (q_proj, v_proj, ...) or "
                                            "'all-linear' (every linear layer but the output head)")
    use_dora: bool = False
    name: str | None = None  # adapters/<name>/; default: the recipe's name


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """peft 0.21 calls transformers' deprecated `is_gradient_checkpointing` on every wrap: noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Short names of the model's linear layers (what `target_modules` may list)."""
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def add_lora(model: PreTrainedModel, spec: LoraSpec, base_dir: str | Path) -> PeftModel:
    """`model` frozen, with trainable LoRA matrices on `spec.target_modules`; the adapter records
    `base_dir` (resolved) as its base."""
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_dora=spec.use_dora,
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    try:
        with _quiet():
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # no module matched target_modules
        raise ConfigError(f"lora.target_modules: {spec.target_modules!r} matches no layer of the base model "
                          f"({str(e).splitlines()[0][:160]}); its linear layers are "
                          f"{', '.join(linear_module_names(model))}, or use 'all-linear'",
                          param="lora.target_modules") from None
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
    return peft_model


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base folder an adapter says it was trained on (adapter_config.json)."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise RunError(f"{adapter_dir} is not a peft adapter (no adapter_config.json)")
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, base_name: str) -> PeftModel:
    """`model` with the adapter of `adapter_dir` on it; an adapter trained on another architecture
    is a RunError naming both."""
    try:
        with _quiet():
            return PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        why = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise RunError(f"the adapter {adapter_dir} does not fit the base {base_name} (it was trained on "
                       f"{adapter_base(adapter_dir)}): {why[:200]}") from None


def merged(model: PeftModel) -> PreTrainedModel:
    """A plain transformers model with the adapter folded into its weights; `model` is left as it
    is (a copy is merged, so training state and the adapter stay usable)."""
    return copy.deepcopy(model).merge_and_unload()
