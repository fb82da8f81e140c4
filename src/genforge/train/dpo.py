"""Direct preference optimisation: a causal LM learns to prefer the chosen reply over the rejected
one, relative to a frozen reference (Rafailov et al. 2023).

The recipe names the `base` (usually an SFT run's model/), the preference pairs (`dataset`: a
.jsonl file or builtin:pydoc-preferences, data/preference.py) and a `dpo:` section. The reference
is the base itself: with a `lora:` section, the same model with its adapter disabled (peft's
`disable_adapter()`: no second copy in memory); without one, a frozen copy of the base.

Each side's score is log pi(reply | prompt) summed over the reply's tokens, its implicit reward
beta * (log pi - log pi_ref). The sigmoid loss is -log sigmoid(reward margin), with
`label_smoothing` eps the conservative form that assumes a share eps of flipped labels; IPO is
(d - 1 / (2 beta))^2, d the chosen minus the rejected log-ratio, each per reply token, as trl has it. Logged, in training
and eval: the rewards of each side, their margin, the preference accuracy (share of pairs whose
chosen reward is the higher) and the likelihood accuracy (share of pairs whose chosen reply has the
higher per-token log-probability), which report.md also gives for the reference: before and after.

Export, checkpoints and adapters are SFT's (train/sft.py): model/ is the complete model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from genforge.common.config import Recipe, Spec, from_dict, rng
from genforge.common.errors import ConfigError
from genforge.common.progress import console
from genforge.common.runs import RunDir
from genforge.data.chat import IGNORE
from genforge.data.preference import (
    PreferenceBatches,
    PreferenceDataSpec,
    encode_pairs,
    read_preferences,
)
from genforge.models.lora import LoraSpec, add_lora
from genforge.train.sft import SFTObjective, chat_max_length, load_base, stop_ids


class DPOSpec(Spec):
    """The recipe's `dpo:` section."""

    beta: float = rng(0.1, min=0, min_exclusive=True, help="how far from the reference the model may move: "
                      "smaller = further")
    loss: str = rng("sigmoid", choices=["sigmoid", "ipo"])
    label_smoothing: float = rng(0.0, min=0, help="sigmoid only: the assumed share of flipped preference "
                                 "labels (conservative DPO), below 0.5")

    def check(self) -> None:
        if self.label_smoothing >= 0.5:
            raise ConfigError(f"dpo.label_smoothing: {self.label_smoothing} is out of range (must be < 0.5: at "
                              "0.5 a pair says nothing about which reply is better)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ConfigError("dpo.label_smoothing: the ipo loss has no label smoothing; remove it or use "
                              "loss: sigmoid")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss of each pair, chosen rewards, rejected rewards) from summed reply log-probabilities;
    `ipo` needs the reply lengths in tokens (its log-ratios are per token)."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss == "sigmoid":
        margin = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    elif loss == "ipo":
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reply_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities of each row's labelled tokens, their count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # cross-entropy gives 0 at ignored positions, so the sum runs over the reply only
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), batch["labels"], reduction="none")
    return token_logps.sum(-1), (batch["labels"] != IGNORE).sum(-1)


class DPOObjective(SFTObjective):
    """SFT's model handling (LoRA or full, checkpoints, export) with the DPO loss."""

    def __init__(self, *args, spec: DPOSpec, reference: PreTrainedModel | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.reference = reference  # None: the LoRA model with its adapter disabled

    def reference_logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is None:
                with self.model.disable_adapter():
                    return reply_logps(self.model, batch)[0]
            return reply_logps(self.reference, batch)[0]

    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, tokens = reply_logps(self.model, batch)
        ref = self.reference_logps(batch)
        n = logps.shape[0] // 2  # chosen rows, then rejected rows
        losses, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.spec.beta, self.spec.loss,
                                            self.spec.label_smoothing, tokens[:n], tokens[n:])
        per_token = logps.detach() / tokens.clamp(min=1)
        return losses.mean(), {
            "rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(),
            "preference_accuracy": (chosen > rejected).float().mean(),
            "likelihood_accuracy": (per_token[:n] > per_token[n:]).float().mean()}

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self._forward(batch)
        return loss, {"loss": loss.detach(), **stats}

    def eval_step(self, batch: dict) -> dict[str, float]:
        loss, stats = self._forward(batch)
        return {"loss": float(loss), **{k: float(v) for k, v in stats.items()}}

    def reference_likelihood_accuracy(self) -> float:
        """The held-out likelihood accuracy of the reference: where DPO started from."""
        hits, pairs = 0.0, 0
        training = self.model.training
        self.model.eval()
        for batch in self.data.val_batches():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logps, tokens = self.reference_logps(batch), (batch["labels"] != IGNORE).sum(-1)
            per_token, n = logps / tokens.clamp(min=1), logps.shape[0] // 2
            hits += float((per_token[:n] > per_token[n:]).sum())
            pairs += n
        self.model.train(training)
        return hits / max(pairs, 1)

    def describe(self) -> dict:
        out = super().describe()
        out["method"] = (f"DPO ({self.spec.loss}, beta {self.spec.beta:g}"
                         + (f", label smoothing {self.spec.label_smoothing:g}" if self.spec.label_smoothing else "")
                         + f") with {out['method']}")
        out["reference"] = ("the base with the adapter disabled" if self.reference is None
                            else "a frozen copy of the base")
        out["examples"] = (f"{self.data.n_train} pairs train, {self.data.n_val} held out"
                           + (f", {self.dropped} dropped (a side without a reply token within max_length)"
                              if self.dropped else ""))
        if self.data.n_val:
            out["reference likelihood accuracy (held out)"] = f"{self.reference_likelihood_accuracy():.4f}"
        return out


def build(recipe: Recipe, device: torch.device) -> tuple[DPOObjective, PreferenceBatches]:
    if recipe.model:
        raise ConfigError(f"model: the dpo family takes its model from `base`; remove the model section "
                          f"(got {sorted(recipe.model)})", param="model")
    lora = from_dict(LoraSpec, recipe.lora, "lora") if recipe.lora is not None else None
    spec = from_dict(DPOSpec, recipe.dpo, "dpo")
    data_cfg = from_dict(PreferenceDataSpec, recipe.data, "data")
    pairs = read_preferences(recipe.dataset)  # bad rows fail before the model loads
    model, tokenizer, base = load_base(recipe, device)
    max_length = chat_max_length(data_cfg.max_length, model)
    encoded, dropped = encode_pairs(pairs, tokenizer, tokenizer.chat_template, max_length,
                                    stop_ids(model, tokenizer), tokenizer.eos_token_id)
    if dropped:
        console.print(f"[yellow]warning:[/] {dropped} of {len(pairs)} pairs dropped: a side has no reply token "
                      f"left within max_length {max_length}")
    cfg = recipe.train
    data = PreferenceBatches(encoded, cfg.batch_size, max_length, tokenizer.pad_token_id, cfg.seed,
                             data_cfg.val_fraction)
    reference = None
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are initialised at random
    if lora is not None:
        model = add_lora(model, lora, base)
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    name = lora.name if lora is not None and lora.name else recipe.name
    objective = DPOObjective(model, tokenizer, device, RunDir(recipe.run_dir), base, lora, name, data,
                             dropped, spec=spec, reference=reference)
    return objective, data
