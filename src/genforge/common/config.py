"""Recipes: YAML files a person reads top to bottom, checked strictly against dataclasses.

`from_dict` turns a plain dict into a dataclass, naming any unknown key with the closest valid
one ("unknown key 'train.lerning_rate' (did you mean 'lr'?)"), coercing YAML scalars to the
annotated types and enforcing the ranges declared in field metadata (`rng(min=..., max=...)`,
`choices=[...]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from genforge.common.errors import ConfigError

T = TypeVar("T")


def rng(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
        choices: list | None = None, min_exclusive: bool = False, help: str = "") -> Any:
    """A dataclass field with a validated range or set of choices."""
    meta = {"min": min, "max": max, "choices": choices, "min_exclusive": min_exclusive, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Names people bring from other tools, so a misspelt "lerning_rate" still finds "lr".
_ALIASES = {"learning_rate": "lr", "min_learning_rate": "min_lr", "warmup": "warmup_steps", "steps": "max_steps",
            "num_steps": "max_steps", "batch": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "max_grad_norm": "grad_clip", "clip": "grad_clip", "dtype": "precision", "context": "context_length"}


def _suggest(key: str, valid: list[str]) -> str:
    candidates = {v: v for v in valid}
    candidates.update({alias: target for alias, target in _ALIASES.items() if target in valid})
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{candidates[close[0]]}'?)"
    return f" (valid keys: {', '.join(sorted(valid))})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _bad(where, "an integer", value)
            except ValueError:
                pass
        _bad(where, "an integer", value)
    if tp is float:
        if isinstance(value, bool):
            _bad(where, "a number", value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _bad(where, "a number", value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        _bad(where, "a string", value)
    return value


def _bad(where: str, what: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{where}: expected {what}, got {value!r}")


def _check_range(value: Any, meta: typing.Mapping, where: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{where}: {value} is out of range (must be {op} {lo})")
        if hi is not None and value > hi:
            raise ConfigError(f"{where}: {value} is out of range (must be <= {hi})")


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and out-of-range values."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'{_suggest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}'")
    obj = cls(**kwargs)
    for name, f in fields.items():
        _check_range(getattr(obj, name), f.metadata, f"{prefix}{name}")
    post = getattr(obj, "validate", None)
    if callable(post):
        post()
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# Settings of how a run executes, not of what it learns: a `--resume` may change these and no others
# (the schedule, batch, optimizer, precision and seed must stay, or the resumed run is not the same run).
RESUME_MAY_CHANGE = frozenset({"time_budget", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                               "keep_last", "device", "threads", "compile"})


@dataclass
class TrainConfig:
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

    def validate(self) -> None:
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("train: set max_steps or max_tokens (time_budget alone does not size the schedule)")
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise ConfigError(f"train.betas[{i}]: {b} is out of range (must be in [0, 1))")


@dataclass
class Recipe:
    """One runnable job: a family, its dataset, its model and the loop settings."""

    name: str
    family: str = rng(choices=["lm", "vae", "gan", "diffusion", "classifier"])
    dataset: str = rng(help="path of a dataset folder written by `genforge data prepare`")
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict = field(default_factory=dict)
    lora: dict | None = None
    out_dir: str = "runs"

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
