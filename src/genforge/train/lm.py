"""The language-model family: next-token cross-entropy on a prepared token dataset."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from genforge.common.config import Recipe, TrainConfig, from_dict
from genforge.common.errors import ConfigError
from genforge.data.tokens import TokenBatches, TokenDataset
from genforge.models.lm import LMSpec, build_lm_config, count_parameters, create_lm, save_lm
from genforge.train.objective import OptimizerSpec, SingleLoss, adamw


class LMObjective(SingleLoss):
    """Next-token prediction. The loss is computed here, on already-shifted labels, so the
    model's own label shifting (an extra copy per step) is skipped."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 compile: bool = False):
        self.model = model
        # The compiled wrapper shares the parameters; state dicts and export use the plain module.
        self.forward = torch.compile(model) if compile else model
        self.tokenizer = tokenizer
        self.device = device
        self.modules = {"model": model}
        self.moe = hasattr(model.config, "num_local_experts")

    def optimizers(self, cfg: TrainConfig) -> list[OptimizerSpec]:
        return [OptimizerSpec(adamw(self.model.parameters(), cfg, device=self.device))]

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        extra = {"output_router_logits": True} if self.moe else {}
        out = self.forward(input_ids=batch["input_ids"], use_cache=False, **extra)
        logits = out.logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), batch["labels"].view(-1))
        return loss, getattr(out, "aux_loss", None)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, aux = self._loss(batch)
        stats = {"loss": loss.detach()}
        if aux is not None:  # MoE load balancing
            stats["aux_loss"] = aux.detach()
            loss = loss + self.model.config.router_aux_loss_coef * aux
        return loss, stats

    def eval_step(self, batch: dict) -> dict[str, float]:
        loss, _ = self._loss(batch)
        return {"loss": float(loss)}

    def signature(self) -> dict:
        c = self.model.config
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "max_position_embeddings", "num_local_experts",
                "tie_word_embeddings")
        signature = {k: getattr(c, k, None) for k in keys}
        if getattr(c, "state_size", None) is not None:  # state-space only: other runs' signatures stay as saved
            signature["state_size"] = c.state_size
        return signature

    def export(self, model_dir: Path) -> None:
        save_lm(self.model, self.tokenizer, model_dir)

    def describe(self) -> dict:
        return {"parameters": count_parameters(self.model), "architecture": self.model.config.architectures[0]
                if self.model.config.architectures else type(self.model).__name__}


def build(recipe: Recipe, device: torch.device) -> tuple[LMObjective, TokenBatches]:
    dataset = TokenDataset(recipe.dataset)
    spec = from_dict(LMSpec, recipe.model, "model")
    if recipe.data:
        raise ConfigError(f"data: the lm family takes no data options, got {sorted(recipe.data)}")
    config = build_lm_config(spec, dataset.tokenizer)
    torch.manual_seed(recipe.train.seed)
    model = create_lm(config).to(device)
    model.config.architectures = [type(model).__name__]
    context = config.max_position_embeddings
    data = TokenBatches(dataset.split("train"), dataset.split("val"), recipe.train.batch_size, context,
                        recipe.train.seed)
    return LMObjective(model, dataset.tokenizer, device, compile=recipe.train.compile), data
