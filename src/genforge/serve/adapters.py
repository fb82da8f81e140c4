"""LoRA adapters served over one base: the registry (name -> peft folder) and its LRU of loaded weights.

    genforge serve BASE --adapter sql=runs/sql/adapters/sql --adapters-dir runs/more/adapters \
        --max-loaded-adapters 4

Every adapter is checked at start (serve/adapters.py -> models/multilora.read_adapter): its recorded
base must be the served one and every LoRA matrix must fit the base's projection, else the server
does not start (the error names the adapter and both bases). Weights are read from disk when a
request first needs them, into one of `max_loaded` slots of the fast path's stacked LoRA tensors;
when all slots are taken, the least recently used adapter that no running sequence uses is evicted.
A request whose adapter cannot get a slot (every slot pinned by running sequences) waits in the
queue; requests behind it for loaded adapters go ahead.
"""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from genforge.common.errors import ConfigError, RunError
from genforge.models.lm import model_folder
from genforge.models.multilora import AdapterInfo, MultiLora, read_adapter

DEFAULT_MAX_LOADED = 4


def parse_adapter_flags(pairs: list[str], folder: str | None) -> dict[str, Path]:
    """`--adapter NAME=PATH` (repeatable) and `--adapters-dir DIR` (each sub-folder with an
    adapter_config.json is an adapter named after it) -> {name: folder}."""
    out: dict[str, Path] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter {pair!r}: expected NAME=PATH (e.g. sql=runs/sql/adapters/sql)",
                              param="adapter")
        if name.strip() in out:
            raise ConfigError(f"--adapter {name.strip()}: the name is given twice", param="adapter")
        out[name.strip()] = Path(path.strip())
    if folder is not None:
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"--adapters-dir {folder}: not a folder", param="adapters_dir")
        found = sorted(p for p in root.iterdir() if (p / "adapter_config.json").is_file())
        if not found:
            raise ConfigError(f"--adapters-dir {folder}: no adapter in it (sub-folders with adapter_config.json)",
                              param="adapters_dir")
        for p in found:
            if p.name in out:
                raise ConfigError(f"adapter {p.name}: named by --adapter and found in --adapters-dir {folder}",
                                  param="adapter")
            out[p.name] = p
    return out


def _check_base(name: str, folder: Path, served: Path | None, base_name: str, model: Any) -> None:
    """The adapter's recorded base must be the served one: the same folder when it names a folder
    on disk, else the same final name (a hub id such as org/SmolLM-135M against a local copy)."""
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise RunError(f"adapter {name}: {folder} is not a peft adapter folder (no adapter_config.json)")
    try:
        recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise RunError(f"adapter {name}: cannot read {config}: {e}") from None
    if recorded is None or served is None:
        return  # nothing to compare: the shapes (read_adapter) are the check
    try:
        here = model_folder(served).resolve()
    except RunError:
        here = served.resolve()
    rec = Path(recorded)
    if rec.exists():
        try:
            theirs = model_folder(rec).resolve()
        except RunError:
            theirs = rec.resolve()
        if theirs == here:
            return
    else:
        names = {base_name, here.name, here.parent.name, Path(str(getattr(model.config, "_name_or_path", ""))).name}
        if rec.name in names:
            return
    raise RunError(f"adapter {name} ({folder}) was trained on {recorded}, but this server's base is "
                   f"{served}; serve it over its own base, or correct base_model_name_or_path in its "
                   f"adapter_config.json if the two are the same model")


class AdapterRegistry:
    """The adapters a server offers and which of them are in memory (see the module docstring).

    The engine calls `acquire(name)` when it admits a sequence (a slot id, or None: wait) and
    `release(slot)` when the sequence ends; both from its scheduler thread, under a lock all the same
    because /metrics reads the counts from another thread.
    """

    def __init__(self, adapters: dict[str, Path], model: Any, base_name: str, *, served_path: Path | None,
                 max_loaded: int = DEFAULT_MAX_LOADED):
        if max_loaded < 1:
            raise ConfigError(f"--max-loaded-adapters {max_loaded}: must be at least 1", param="max_loaded_adapters")
        self.base_name = base_name
        self.infos: dict[str, AdapterInfo] = {}
        for name, path in adapters.items():
            if name == base_name:
                raise ConfigError(f"adapter {name}: the name is the base model's; pick another", param="adapter")
            if not Path(path).exists():
                raise RunError(f"adapter {name}: {path} does not exist")
            _check_base(name, Path(path), served_path, base_name, model)
            self.infos[name] = read_adapter(name, path, model, str(served_path or base_name))
        self.max_loaded = min(max_loaded, len(self.infos))
        self.lora: MultiLora | None = None
        self._slots: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU order, oldest first
        self._pins: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self.loads: collections.Counter[str] = collections.Counter()
        self.evictions: collections.Counter[str] = collections.Counter()
        # metrics hooks (serve/metrics.py): (loaded, evicted) and (adapter or base, completion tokens)
        self.on_load: Callable[[str, str | None], None] | None = None
        self.on_finish: Callable[[str, int], None] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def attach(self, runner: Any, model: Any) -> None:
        """Give the runner its stacked LoRA slots; only the Llama fast path runs per-row adapters."""
        if not getattr(runner, "fast_path", False):
            raise ConfigError("adapters are served on the Llama-style fast path only; this base runs on the "
                              "generic path (merge each adapter with `genforge merge` and serve those instead)",
                              param="adapter")
        if any(block is not None for block in getattr(runner, "moe", ())):
            raise ConfigError("adapters are not served per row over a mixture-of-experts base (its MoE "
                              "layers run the model's own expert block); merge each adapter with `genforge "
                              "merge` and serve those instead", param="adapter")
        self.lora = MultiLora(model, list(self.infos.values()), self.max_loaded, dtype=runner.dtype,
                              device=runner.device)
        runner.lora = self.lora

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def acquire(self, name: str) -> int | None:
        """The slot holding `name`'s weights, loading them (and evicting the least recently used
        unpinned adapter) if needed; None when every slot is in use by running sequences."""
        with self._lock:
            if name in self._slots:
                self._slots.move_to_end(name)
                slot = self._slots[name]
                self._pins[slot] += 1
                return slot
            used = set(self._slots.values())
            evicted = None
            if len(used) < self.max_loaded:
                slot = min(set(range(1, self.max_loaded + 1)) - used)
            else:
                evicted = next((n for n, s in self._slots.items() if not self._pins[s]), None)
                if evicted is None:
                    return None
                slot = self._slots.pop(evicted)
                self.evictions[evicted] += 1
            assert self.lora is not None, "attach() first"
            self.lora.load(slot, self.infos[name])
            self._slots[name] = slot
            self._pins[slot] += 1
            self.loads[name] += 1
        if self.on_load is not None:
            self.on_load(name, evicted)
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if self._pins[slot] > 0:
                self._pins[slot] -= 1

    def finished(self, name: str | None, completion_tokens: int) -> None:
        """A sequence of `name` (None: the base) ended after `completion_tokens` tokens."""
        if self.on_finish is not None:
            self.on_finish(name or self.base_name, completion_tokens)
