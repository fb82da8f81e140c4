"""Knowledge distillation: a student LM learns the next-token distributions of a teacher (Hinton
et al. 2015), mixed with the ordinary cross-entropy on the data's own next tokens.

The recipe names the `teacher` (a run or Hugging Face folder, frozen) and the student: a `base` to
fine-tune (with an optional `lora:` section) or a `model:` section for a fresh model from a preset,
which takes the teacher's tokenizer. They may differ in size but must share the tokenizer, since
the two distributions are compared token id by token id. The data is either SFT's (chat .jsonl or
builtin:pydoc-instructions, data/chat.py: the loss on the assistant's tokens) or a token dataset
folder from `genforge data prepare` (every position).

Loss = alpha * T^2 * KL + (1 - alpha) * cross-entropy, with KL between the teacher's and the
student's softmax at temperature T, averaged over the supervised positions. The T^2 keeps the KL's
gradients on the cross-entropy's scale whatever T is. Forward KL(teacher || student) (the default)
spreads the student over everything the teacher thinks likely; reverse KL(student || teacher)
makes it pick the teacher's main modes.

Export, checkpoints and adapters are SFT's (train/sft.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from genforge.common.config import Recipe, Spec, from_dict, rng
from genforge.common.errors import ConfigError
from genforge.common.progress import console
from genforge.common.runs import RunDir
from genforge.data.chat import IGNORE, ChatBatches, SFTDataSpec, encode_conversations, read_conversations
from genforge.data.tokens import TokenBatches, TokenDataset
from genforge.models.lm import LMSpec, build_lm_config, count_parameters, create_lm
from genforge.models.lora import LoraSpec, add_lora
from genforge.train.sft import SFTObjective, chat_max_length, load_base, stop_ids


class DistillSpec(Spec):
    """The recipe's `distill:` section."""

    temperature: float = rng(2.0, min=0, min_exclusive=True, help="softens both distributions; higher = more "
                             "weight on the teacher's less likely tokens")
    alpha: float = rng(0.5, min=0, max=1, help="weight of the KL term; 1 - alpha weighs the hard-label loss")
    kl: str = rng("forward", choices=["forward", "reverse"])


def uses_chat(dataset: str) -> bool:
    """Whether a distill dataset is SFT conversations (else a token dataset folder)."""
    return dataset.endswith(".jsonl") or dataset.startswith("builtin:")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               reverse: bool = False) -> torch.Tensor:
    """T^2 * the mean over rows of KL(teacher || student) at temperature T (KL(student || teacher)
    with `reverse`); logits are (rows, vocabulary)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p, q = (student, teacher) if reverse else (teacher, student)  # KL(p || q), both as log-probabilities
    return (p.exp() * (p - q)).sum(-1).mean() * temperature ** 2


class DistillObjective(SFTObjective):
    """SFT's model handling (LoRA or full, checkpoints, export) with the distillation loss."""

    def __init__(self, *args, spec: DistillSpec, teacher: PreTrainedModel, teacher_dir: Path, vocab: int,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.spec, self.teacher, self.teacher_dir, self.vocab = spec, teacher, teacher_dir, vocab

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = self.model(**inputs, use_cache=False).logits
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs, use_cache=False).logits
        supervised = batch["labels"] != IGNORE
        # only supervised positions; both models' output rows past the tokenizer's (padding) are not tokens
        student, teacher = logits[supervised][:, :self.vocab], teacher_logits[supervised][:, :self.vocab]
        kl = distill_kl(student, teacher, self.spec.temperature, reverse=self.spec.kl == "reverse")
        ce = F.cross_entropy(student.float(), batch["labels"][supervised])
        return self.spec.alpha * kl + (1 - self.spec.alpha) * ce, kl.detach(), ce.detach()

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, kl, ce = self._forward(batch)
        return loss, {"loss": loss.detach(), "kl": kl, "ce": ce}

    def eval_step(self, batch: dict) -> dict[str, float]:
        loss, kl, ce = self._forward(batch)
        return {"loss": float(loss), "kl": float(kl), "ce": float(ce)}

    def signature(self) -> dict:
        return {**super().signature(), "base": str(self.base) if self.base else None,
                "teacher": str(self.teacher_dir)}

    def describe(self) -> dict:
        total = count_parameters(self.model)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        s = self.spec
        out = {"teacher": f"{self.teacher_dir} ({count_parameters(self.teacher):,} parameters)",
               "student": str(self.base) if self.base else "a fresh model from the recipe's model section",
               "parameters": total, "trainable parameters": f"{trainable:,} ({100 * trainable / total:.2f}%)",
               "method": f"{s.kl} KL at temperature {s.temperature:g}, weight {s.alpha:g}; cross-entropy "
                         f"{1 - s.alpha:g}" + ("" if self.lora is None else
                                                f"; LoRA r {self.lora.r}, alpha {self.lora.alpha:g}")}
        if isinstance(self.data, ChatBatches):
            out["examples"] = f"{self.data.n_train} train, {self.data.n_val} held out" + (
                f", {self.dropped} dropped (no assistant token within max_length)" if self.dropped else "")
        if self.lora is not None:
            out["adapter"] = str(self.adapter_dir)
        return out


def check_same_tokenizer(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, student_name: str,
                         teacher_name: str) -> None:
    """Distillation compares distributions token id by token id: one vocabulary, or a ConfigError naming both."""
    s, t = student.get_vocab(), teacher.get_vocab()
    if s != t:
        differ = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ConfigError(f"teacher: the teacher {teacher_name} and the student {student_name} have different "
                          f"tokenizers ({len(t):,} and {len(s):,} tokens; e.g. {', '.join(f'{k!r}={v}' for k, v in differ)}"
                          "); distillation compares their next-token distributions token by token, so the student "
                          "must use the teacher's tokenizer", param="teacher")


def build(recipe: Recipe, device: torch.device) -> tuple[DistillObjective, ChatBatches | TokenBatches]:
    spec = from_dict(DistillSpec, recipe.distill, "distill")
    lora = from_dict(LoraSpec, recipe.lora, "lora") if recipe.lora is not None else None
    if lora is not None and not recipe.base:
        raise ConfigError("lora: a fresh student (a model section) trains all its weights; remove the lora "
                          "section or start the student from a base", param="lora")
    chat = uses_chat(recipe.dataset)
    data_cfg = from_dict(SFTDataSpec, recipe.data, "data")
    if not chat and set(recipe.data) - {"max_length"}:
        raise ConfigError(f"data: a token dataset takes only max_length (its context), got {sorted(recipe.data)}",
                          param="data")
    conversations = read_conversations(recipe.dataset) if chat else None  # bad rows fail before models load
    tokens = None if chat else TokenDataset(recipe.dataset)
    teacher, tokenizer, teacher_dir = load_base(recipe, device, key="teacher")
    teacher.requires_grad_(False)
    cfg = recipe.train
    torch.manual_seed(cfg.seed)  # a fresh student's weights and LoRA's A matrices are initialised at random
    if recipe.base:
        model, student_tokenizer, base = load_base(recipe, device)
        check_same_tokenizer(student_tokenizer, tokenizer, str(base), str(teacher_dir))
        tokenizer = student_tokenizer  # its chat template is the one the student is served with
    else:
        model = create_lm(build_lm_config(from_dict(LMSpec, recipe.model, "model"), tokenizer)).to(device)
        model.config.architectures = [type(model).__name__]
        base = None
    if tokens is not None:
        check_same_tokenizer(tokens.tokenizer, tokenizer, f"dataset {recipe.dataset}", str(teacher_dir))
    vocab = len(tokenizer)
    for who, m in (("teacher", teacher), ("student", model)):
        if m.get_output_embeddings().weight.shape[0] < vocab:
            raise ConfigError(f"{who}: its output layer has {m.get_output_embeddings().weight.shape[0]} rows for a "
                              f"tokenizer of {vocab} tokens", param="teacher" if who == "teacher" else "base")
    max_length = chat_max_length(data_cfg.max_length, model, teacher, whose="the student's or the teacher's")
    dropped = 0
    if chat:
        examples, dropped = encode_conversations(conversations, tokenizer, tokenizer.chat_template, max_length,
                                                 stop_ids(model, tokenizer), tokenizer.eos_token_id)
        if dropped:
            console.print(f"[yellow]warning:[/] {dropped} of {len(conversations)} conversations dropped: no "
                          f"assistant token left within max_length {max_length}")
        data = ChatBatches(examples, cfg.batch_size, max_length, tokenizer.pad_token_id, cfg.seed,
                           data_cfg.val_fraction, data_cfg.packing)
    else:
        data = TokenBatches(tokens.split("train"), tokens.split("val"), cfg.batch_size, max_length, cfg.seed)
    if lora is not None:
        model = add_lora(model, lora, base)
    name = lora.name if lora is not None and lora.name else recipe.name
    objective = DistillObjective(model, tokenizer, device, RunDir(recipe.run_dir), base, lora, name, data, dropped,
                                 spec=spec, teacher=teacher, teacher_dir=teacher_dir, vocab=vocab)
    return objective, data
