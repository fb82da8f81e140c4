"""Recipes: YAML files a person reads top to bottom, checked strictly by pydantic models.

Every recipe section is a `Spec` (a pydantic model that forbids unknown keys). `from_dict` validates
a plain dict against one and turns pydantic's errors into one line that names the key by its full
path: "unknown key 'train.lerning_rate' (did you mean 'lr'?)", "train.lr: -1.0 is out of range
(must be > 0)", "train.precision: 'fp8' is not one of auto, fp32, bf16, fp16". Fields declare their
range or choices with `rng(default, min=..., max=..., choices=[...])`; cross-field rules go in
`Spec.check()`, which raises `ConfigError` itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError, PydanticUndefined

from genforge.common.errors import ConfigError

S = TypeVar("S", bound="Spec")


def rng(default: Any = PydanticUndefined, *, min: float | None = None, max: float | None = None,
        choices: list | None = None, min_exclusive: bool = False, help: str = "") -> Any:
    """A field with a validated range (`min`, `max`) or set of `choices`; no default = required."""
    limits: dict[str, Any] = {"le": max}
    limits["gt" if min_exclusive else "ge"] = min
    limits = {k: v for k, v in limits.items() if v is not None}
    extra = {"choices": list(choices)} if choices is not None else None
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: type(default)(default), description=help or None,
                     json_schema_extra=extra, **limits)
    return Field(default, description=help or None, json_schema_extra=extra, **limits)


class Spec(BaseModel):
    """A recipe section: unknown keys are errors; numbers may be written as strings ("1e-3")."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_as_numbers(cls, data: Any) -> Any:
        # pydantic reads `true` as 1 for an int field; a recipe saying `batch_size: true` is a mistake
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                value = data.get(name)
                if isinstance(value, bool) and _number_kind(info.annotation):
                    raise PydanticCustomError("genforge_type", "{field}", {"field": name, "value": value,
                                                                          "kind": _number_kind(info.annotation)})
        return data

    @model_validator(mode="after")
    def _choices_then_check(self) -> Spec:
        for name, info in type(self).model_fields.items():
            choices = (info.json_schema_extra or {}).get("choices") if isinstance(info.json_schema_extra, dict) else None
            value = getattr(self, name)
            if choices is not None and value not in choices:
                raise PydanticCustomError("genforge_choice", "{field}", {"field": name, "value": value,
                                                                        "choices": choices})
        try:
            self.check()
        except ConfigError as e:
            # Reported among pydantic's errors, so an unknown or missing key elsewhere still comes first.
            raise PydanticCustomError("genforge_check", "{message}", {"message": e.message}) from None
        return self

    def check(self) -> None:
        """Cross-field rules; raise ConfigError with the field's full path."""


def _number_kind(annotation: Any) -> str | None:
    args = set(typing.get_args(annotation)) or {annotation}
    if bool in args:
        return None
    if int in args:
        return "an integer"
    if float in args:
        return "a number"
    return None


# Names people bring from other tools, so a misspelt "lerning_rate" still finds "lr".
_ALIASES = {"learning_rate": "lr", "min_learning_rate": "min_lr", "warmup": "warmup_steps", "steps": "max_steps",
            "num_steps": "max_steps", "batch": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "max_grad_norm": "grad_clip", "clip": "grad_clip", "dtype": "precision", "context": "context_length",
            "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def _suggest(key: str, valid: list[str]) -> str:
    candidates = {v: v for v in valid}
    candidates.update({alias: target for alias, target in _ALIASES.items() if target in valid})
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{candidates[close[0]]}'?)"
    return f" (valid keys: {', '.join(sorted(valid))})"


def _spec_of(annotation: Any) -> type[Spec] | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, Spec):
            return arg
    return None


def _walk(cls: type[Spec], loc: tuple) -> tuple[type[Spec] | None, Any]:
    """(the Spec holding the last key of `loc`, that field's annotation) for an error location."""
    spec: type[Spec] | None = cls
    annotation: Any = None
    for i, part in enumerate(loc):
        if spec is None or not isinstance(part, str) or part not in spec.model_fields:
            return spec, annotation
        annotation = spec.model_fields[part].annotation
        if i < len(loc) - 1:
            spec = _spec_of(annotation)
    return spec, annotation


def _path(where: str, loc: tuple) -> str:
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_EXPECTED = {"int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
             "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true/false",
             "bool_type": "true/false", "string_type": "a string", "list_type": "a list", "tuple_type": "a list",
             "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}
_LIMITS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def _message(err: dict, cls: type[Spec], where: str) -> str:
    """One pydantic error as the one line a person reads."""
    kind, loc, value, ctx = err["type"], tuple(err["loc"]), err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = cls if len(loc) == 1 else _spec_of(_walk(cls, loc[:-1])[1])
        valid = list(parent.model_fields) if parent is not None else []
        return f"unknown key '{_path(where, loc)}'{_suggest(str(loc[-1]), valid)}"
    if kind == "missing" and loc and isinstance(loc[-1], int):
        ann = _walk(cls, loc[:-1])[1]
        tup = next((a for a in (ann, *typing.get_args(ann)) if typing.get_origin(a) is tuple), None)
        n = len(typing.get_args(tup)) if tup is not None else "more"
        return f"{_path(where, loc[:-1])}: expected {n} values, got {len(value) if hasattr(value, '__len__') else value!r}"
    if kind == "missing":
        return f"missing required key '{_path(where, loc)}'"
    if kind == "genforge_choice":
        shown = ", ".join(map(str, ctx["choices"]))
        return f"{_path(where, (*loc, ctx['field']))}: {ctx['value']!r} is not one of {shown}"
    if kind == "genforge_check":
        return ctx["message"]
    if kind == "genforge_type":
        return f"{_path(where, (*loc, ctx['field']))}: expected {ctx['kind']}, got {ctx['value']!r}"
    if kind in ("too_long", "too_short") and "actual_length" in ctx:
        n = ctx.get("max_length") if kind == "too_long" else ctx.get("min_length")
        return f"{_path(where, loc)}: expected {n} values, got {ctx['actual_length']}"
    if kind in _LIMITS:
        key, op = _LIMITS[kind]
        if isinstance(value, (int, str)) and float in (typing.get_args(_walk(cls, loc)[1]) or {_walk(cls, loc)[1]}):
            value = float(value)  # shown as the recipe's value was read: train.lr: -1.0
        limit = ctx[key]
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return f"{_path(where, loc)}: {value} is out of range (must be {op} {limit})"
    if kind in _EXPECTED:
        got = f"{type(value).__name__} {value!r}" if _EXPECTED[kind] == "a mapping" else repr(value)
        return f"{_path(where, loc)}: expected {_EXPECTED[kind]}, got {got}"
    if kind == "literal_error":
        return f"{_path(where, loc)}: {value!r} is not one of {ctx.get('expected')}"
    return f"{_path(where, loc)}: {err['msg']}"


_ORDER = {"extra_forbidden": 0, "missing": 1}


def from_dict(cls: type[S], data: dict | None, where: str = "") -> S:
    """Validate recipe section `data` (None = empty) against Spec `cls`; one ConfigError if it is wrong."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    try:
        return cls.model_validate(dict(data or {}))
    except ValidationError as e:
        errors = sorted(e.errors(include_url=False), key=lambda err: _ORDER.get(err["type"], 2))
        raise ConfigError(_message(errors[0], cls, where)) from None


def to_dict(obj: Any) -> Any:
    """A Spec (or dataclass) as plain YAML-able data (tuples become lists)."""
    if isinstance(obj, BaseModel):
        return {name: to_dict(getattr(obj, name)) for name in type(obj).model_fields}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# Settings of how a run executes, not of what it learns: a `--resume` may change these and no others
# (the schedule, batch, optimizer, precision and seed must stay, or the resumed run is not the same run).
# A checkpoint holds full (unsharded) state and the data position is the global step, so a resume may also
# change how many processes train and how they split the work.
RESUME_MAY_CHANGE = frozenset({"time_budget", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                               "keep_last", "device", "threads", "compile", "parallel", "backend",
                               "activation_checkpointing", "tensor_parallel_size"})


# The families whose runs hold an image model; every other family's run holds a causal LM (pre-trained,
# fine-tuned, aligned or distilled), which serve, eval and generate treat alike.
IMAGE_FAMILIES = ("vae", "gan", "diffusion", "classifier", "latent-diffusion")


class TrainConfig(Spec):
    """What the one training loop needs; the same for every family."""

    max_steps: int | None = rng(None, min=1, help="optimizer steps; sets the schedule length")
    max_tokens: int | None = rng(None, min=1, help="alternative to max_steps for token-based families")
    time_budget: float | None = rng(None, min=0, min_exclusive=True, help="seconds; only cuts a run short")
    batch_size: int = rng(16, min=1)
    grad_accum: int = rng(1, min=1)
    lr: float = rng(1e-3, min=0, min_exclusive=True, max=10)
    min_lr: float | None = rng(None, min=0, help="end of the cosine; default lr/10")
    warmup_steps: int = rng(100, min=0)
    weight_decay: float = rng(0.1, min=0)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = rng(1.0, min=0)
    precision: str = rng("auto", choices=["auto", "fp32", "bf16", "fp16"])
    device: str = rng("auto", choices=["auto", "cpu", "cuda", "mps"])
    compile: bool = False
    seed: int = 1337
    eval_every: int = rng(200, min=1)
    eval_batches: int = rng(20, min=1)
    log_every: int = rng(10, min=1)
    checkpoint_every: int = rng(500, min=1)
    keep_last: int = rng(2, min=1)
    ema_decay: float | None = rng(None, min=0, max=1)
    threads: int | None = rng(None, min=1, help="CPU threads; default: all cores")
    # Several processes (torchrun, or `genforge train --nproc N`); train/distributed.py. batch_size stays
    # the global batch: each of N processes trains on batch_size / N rows of it.
    parallel: str = rng("ddp", choices=["none", "ddp", "fsdp"],
                        help="on several processes: ddp replicates the model, fsdp shards it (FSDP2); "
                        "none refuses to run on more than one")
    backend: str = rng("auto", choices=["auto", "gloo", "nccl"], help="auto: nccl on CUDA, gloo on CPU")
    activation_checkpointing: bool = False
    tensor_parallel_size: int = rng(1, min=1, help="reserved: only 1 (no tensor parallelism) is implemented")

    def check(self) -> None:
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("train: set max_steps or max_tokens (time_budget alone does not size the schedule)")
        if self.tensor_parallel_size > 1:
            raise ConfigError(f"train.tensor_parallel_size: {self.tensor_parallel_size} asks for tensor "
                              "parallelism, which is not implemented yet; set it to 1 (shard a large model "
                              "over processes with train.parallel: fsdp)")
        if self.backend == "nccl" and self.device in ("cpu", "mps"):
            raise ConfigError(f"train.backend: nccl runs on CUDA GPUs only, but train.device is {self.device}; "
                              "use train.backend: gloo (or auto)")
        if self.parallel == "fsdp" and self.precision == "fp16":
            raise ConfigError("train.precision: fp16 is not supported with train.parallel: fsdp (its grad "
                              "scaler is not shard-aware); use bf16 or fp32")
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise ConfigError(f"train.betas[{i}]: {b} is out of range (must be in [0, 1))")


class Recipe(Spec):
    """One runnable job: a family, its dataset, its model and the loop settings."""

    name: str
    family: str = rng(choices=["lm", "vae", "gan", "diffusion", "latent-diffusion", "classifier", "sft", "dpo",
                               "distill"])
    dataset: str = rng(help="path of a dataset folder written by `genforge data prepare`; for sft a .jsonl "
                       "file of conversations or builtin:pydoc-instructions; for dpo a .jsonl file of "
                       "preference pairs or builtin:pydoc-preferences; for distill either kind of sft's or lm's")
    base: str | None = rng(None, help="sft, dpo, distill: the model to fine-tune, a run directory or a Hugging "
                           "Face causal-LM folder")
    teacher: str | None = rng(None, help="distill: the model to learn from, a run or Hugging Face folder")
    model: dict = Field(default_factory=dict)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: dict = Field(default_factory=dict)
    lora: dict | None = None
    dpo: dict | None = None  # dpo: beta, loss, label_smoothing (train.dpo.DPOSpec)
    distill: dict | None = None  # distill: temperature, alpha, kl (train.distill.DistillSpec)
    out_dir: str = "runs"

    @model_validator(mode="before")
    @classmethod
    def _train_is_a_section(cls, data: Any) -> Any:
        # validated like any given section, so its errors are reported with the others
        if isinstance(data, dict) and "train" not in data:
            data = {**data, "train": {}}
        return data

    def check(self) -> None:
        if self.family in ("sft", "dpo") and not self.base:
            raise ConfigError(f"missing required key 'base': the {self.family} family fine-tunes a model; set base "
                              "to a run directory or a Hugging Face causal-LM folder")
        if self.family not in ("sft", "dpo", "distill") and self.base is not None:
            raise ConfigError(f"base: the {self.family} family does not start from a base model (sft, dpo and "
                              "distill do); remove the key")
        if self.family == "distill" and not self.teacher:
            raise ConfigError("missing required key 'teacher': the distill family learns from a teacher; set it "
                              "to a run directory or a Hugging Face causal-LM folder")
        if self.family == "distill" and bool(self.base) == bool(self.model):
            raise ConfigError("distill: give the student either as `base` (a model to fine-tune) or as a `model` "
                              "section (a fresh model from a preset), not " + ("both" if self.base else "neither"))
        for key in ("teacher", "dpo", "distill"):
            family = "distill" if key == "teacher" else key
            if self.family != family and getattr(self, key) is not None:
                raise ConfigError(f"{key}: only the {family} family takes this key; remove it")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a recipe tree."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.max_steps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    return tree


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: a recipe is a YAML mapping, got {type(tree).__name__}")
    return tree


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    tree = apply_overrides(load_yaml(path), overrides)
    tree.setdefault("name", Path(path).stem)
    return from_dict(Recipe, tree)


def recipe_from_tree(tree: dict) -> Recipe:
    return from_dict(Recipe, tree)
