"""Supervised fine-tuning: a causal LM (a genforge run or any HF folder) on chat conversations.

The recipe names the `base` model and the conversations (`dataset`: a .jsonl file or
builtin:pydoc-instructions). With a `lora:` section only LoRA (or DoRA) matrices train (peft);
without one every weight does (full fine-tuning). The loss is cross-entropy on the assistant's
tokens only (data/chat.py builds the labels).

Export: model/ always holds the complete fine-tuned model (with a LoRA, the adapter merged into
the weights), with the chat template it was trained with, so `genforge serve RUN/model` and
transformers load it as any LM; a LoRA run also writes its adapter in peft format to
adapters/<name>/. A LoRA run's checkpoints hold only the trained (adapter) weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from genforge.common.config import Recipe, TrainConfig, from_dict
from genforge.common.errors import ConfigError, RunError
from genforge.common.progress import console
from genforge.common.runs import RunDir, atomic_dir
from genforge.data.chat import ChatBatches, SFTDataSpec, encode_conversations, read_conversations
from genforge.models.lm import (
    context_length,
    count_parameters,
    load_lm,
    model_folder,
    resolve_chat_template,
    save_lm,
)
from genforge.models.lora import LoraSpec, add_lora, merged
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw


class TrainedWeights(torch.nn.Module):
    """What a LoRA run checkpoints and averages (EMA): only the parameters that train, so a
    checkpoint is the adapter's size, not the frozen base's. train()/eval() reach the whole model
    (LoRA dropout)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        params = dict(self.model.named_parameters())
        if strict and set(state) != set(self.state_dict()):
            raise RunError("the checkpoint's adapter weights do not match this LoRA configuration")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


class SFTObjective(SingleLoss):
    def __init__(self, model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                 device: torch.device, run: RunDir, base: Path, lora: LoraSpec | None, adapter_name: str,
                 data: ChatBatches, dropped: int):
        self.model, self.tokenizer, self.device, self.run = model, tokenizer, device, run
        self.base, self.lora, self.adapter_name = base, lora, adapter_name
        self.data, self.dropped = data, dropped
        self.modules = {"adapter": TrainedWeights(model)} if lora is not None else {"model": model}

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        return [OptimizerSpec(adamw([p for p in self.model.parameters() if p.requires_grad], cfg,
                                    device=self.device))]

    def _loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False, **extra).logits
        # ignore_index rather than logits[labels != -100]: the boolean index copied the supervised
        # rows' logits and its backward made a zero tensor the size of all logits (+115 MiB at peak
        # on benchmarks/finetune.py's lm-tiny batches, for no measurable speed)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        return loss, int((batch["labels"] != -100).sum())

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, n = self._loss(batch)
        return loss, {"loss": loss.detach(), "supervised_tokens": n}

    def eval_step(self, batch: dict) -> dict[str, float]:
        return {"loss": float(self._loss(batch)[0])}

    def signature(self) -> dict:
        c = self.model.config
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "max_position_embeddings")
        lora = None if self.lora is None else {k: v for k, v in self.lora.model_dump().items() if k != "name"}
        return {**{k: getattr(c, k, None) for k in keys}, "base": str(self.base), "lora": lora}

    def parallel_modules(self) -> dict[str, torch.nn.Module]:
        return {"model": self.model}  # what the loss calls (a LoRA run checkpoints only the adapter's weights)

    @property
    def adapter_dir(self) -> Path:
        return self.run.adapters_dir / self.adapter_name

    def export(self, model_dir: Path) -> None:
        if self.lora is None:
            save_lm(self.model, self.tokenizer, model_dir)
            return
        with atomic_dir(self.adapter_dir) as tmp:
            self.model.save_pretrained(tmp)
        save_lm(merged(self.model), self.tokenizer, model_dir)

    def describe(self) -> dict:
        total = count_parameters(self.model)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        out = {"base": str(self.base), "parameters": total,
               "trainable parameters": f"{trainable:,} ({100 * trainable / total:.2f}%)",
               "method": "full fine-tuning" if self.lora is None else
               f"{'DoRA' if self.lora.use_dora else 'LoRA'} r {self.lora.r}, alpha {self.lora.alpha:g}, "
               f"targets {self.lora.target_modules}",
               "examples": f"{self.data.n_train} train, {self.data.n_val} held out"
               + (f", {self.dropped} dropped (no assistant token within max_length)" if self.dropped else "")
               + (", packed" if self.data.packed_length else "")}
        if self.lora is not None:
            out["adapter"] = str(self.adapter_dir)
        return out


def load_base(recipe: Recipe, device: torch.device, key: str = "base") -> tuple[PreTrainedModel,
                                                                               PreTrainedTokenizerBase, Path]:
    """(model, tokenizer, resolved folder) of the recipe's `base` (or `teacher`), with the chat
    template training renders with: the one written into model/ and so the one serve uses."""
    try:
        folder = model_folder(getattr(recipe, key)).resolve()
        model, tokenizer = load_lm(folder, device)
    except RunError as e:
        raise ConfigError(f"{key}: {e.message}", param=key) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer of {folder} has no EOS token, which the model must learn to end "
                          "its turn with; give it one (tokenizer_config.json eos_token)", param=key)
    tokenizer.chat_template = resolve_chat_template(tokenizer)
    return model, tokenizer, folder


def chat_max_length(requested: int | None, *models: PreTrainedModel, whose: str = "the base model's") -> int:
    """data.max_length, by default (and at most) the shortest context of `models`."""
    limit = min(context_length(m) for m in models)
    if requested is not None and requested > limit:
        raise ConfigError(f"data.max_length: {requested} is beyond {whose} context of {limit} tokens",
                          param="data.max_length")
    return requested or limit


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a turn: the tokenizer's EOS and the model config's EOS id(s)."""
    config_eos = model.config.eos_token_id
    return {tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])} - {None}


def build(recipe: Recipe, device: torch.device) -> tuple[SFTObjective, ChatBatches]:
    if recipe.model:
        raise ConfigError(f"model: the sft family takes its model from `base`; remove the model section "
                          f"(got {sorted(recipe.model)})", param="model")
    lora = from_dict(LoraSpec, recipe.lora, "lora") if recipe.lora is not None else None
    data_cfg = from_dict(SFTDataSpec, recipe.data, "data")
    conversations = read_conversations(recipe.dataset)  # bad rows fail before the model loads
    model, tokenizer, base = load_base(recipe, device)
    max_length = chat_max_length(data_cfg.max_length, model)
    examples, dropped = encode_conversations(conversations, tokenizer, tokenizer.chat_template, max_length,
                                             stop_ids(model, tokenizer), tokenizer.eos_token_id)
    if dropped:
        console.print(f"[yellow]warning:[/] {dropped} of {len(conversations)} conversations dropped: no "
                      f"assistant token left within max_length {max_length}")
    cfg = recipe.train
    data = ChatBatches(examples, cfg.batch_size, max_length, tokenizer.pad_token_id, cfg.seed,
                       data_cfg.val_fraction, data_cfg.packing)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are initialised at random
    if lora is not None:
        model = add_lora(model, lora, base)
    name = lora.name if lora is not None and lora.name else recipe.name
    return SFTObjective(model, tokenizer, device, RunDir(recipe.run_dir), base, lora, name, data, dropped), data
