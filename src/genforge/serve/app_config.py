"""The serve config file: which application-layer steps run in front of the engine, and how.

    genforge serve RUN --config serve.yaml          # or the flags: --cache, --rag NAME, --guard POLICY

    store: ~/.cache/genforge/serve-state   # a folder (embedded SQLite) or postgresql://user@host/db
    embedder: null                    # a local sentence-transformers folder; default all-MiniLM-L6-v2
    own_process: true                 # run the steps in a process of their own (false: in the server's)
    process_threads: 1                # torch threads of that process (1: the cores stay the engine's)
    process_priority: idle            # idle | low (nice 19) | normal: its CPU time against the engine's
    cache:
      enabled: true
      threshold: 0.75                 # similarity a near match needs (chosen on the dev pairs)
      verify: true                    # the verifier must agree the two questions ask the same thing
      ttl_s: 86400
      max_entries: 10000
      allow_sampled: false            # cache requests with temperature > 0 and no seed too
    rag:
      index: pydoc
      k: 4
      mode: null                      # dense | bm25 | hybrid; null: the mode `rag eval` measured best
      reranker: null                  # a local sentence-transformers cross-encoder folder
    guard:
      policy: block                   # off | block | redact | log
      injection_threshold: null       # null: the trained detector's own threshold
      allowlist: []                   # regexes of text that is never an injection
      banned: []                      # regexes never let out in a response
    alerts:                           # anomaly alerts over the server's own metrics (serve/alerts.py)
      enabled: true
      interval_s: 5                   # seconds between samples
      window: 60                      # samples the newest one is compared with
      detector: zscore                # zscore | iforest (benchmarks/alerts.py measured both)
      zscore_threshold: 6.0
      iforest_threshold: 0.7
      consecutive: 2                  # samples over (under) the threshold to start (clear) an anomaly

Steps that change answers (cache, RAG, guard) are off unless turned on here or by a flag. The
file is checked strictly, like a recipe: an unknown key or a value out of range is one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field

from genforge.common.config import Spec, from_dict, load_yaml, rng
from genforge.common.errors import ConfigError
from genforge.serve.alerts import AlertSpec

GUARD_POLICIES = ["off", "block", "redact", "log"]
RAG_MODES = ["dense", "bm25", "hybrid"]


class CacheSpec(Spec):
    enabled: bool = False
    threshold: float = rng(0.75, min=0, max=1, help="similarity a near match needs (chosen on the dev pairs)")
    verify: bool = True
    ttl_s: float | None = rng(86400.0, min=0, min_exclusive=True)
    max_entries: int = rng(10000, min=1)
    allow_sampled: bool = False


class RagSpec(Spec):
    index: str | None = None
    k: int = rng(4, min=1, max=20)
    mode: str | None = rng(None, choices=[None, *RAG_MODES])
    reranker: str | None = None  # a local cross-encoder folder: rerank the top candidates


class GuardSpec(Spec):
    policy: str = rng("off", choices=GUARD_POLICIES)
    injection_threshold: float | None = rng(None, min=0, max=1)
    allowlist: list[str] = rng([])
    banned: list[str] = rng([])

    def check(self) -> None:
        for key in ("allowlist", "banned"):
            for i, pattern in enumerate(getattr(self, key)):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"guard.{key}[{i}]: {pattern!r} is not a valid regular expression ({e})") from None


class AppConfig(Spec):
    store: str | None = None
    embedder: str | None = None
    own_process: bool = True  # the steps in a process of their own (serve/layer_steps.py says why)
    process_threads: int = rng(1, min=1, max=256, help="torch threads of that process")
    process_priority: str = rng("idle", choices=["idle", "low", "normal"], help="CPU priority of that process")
    cache: CacheSpec = Field(default_factory=CacheSpec)
    rag: RagSpec = Field(default_factory=RagSpec)
    guard: GuardSpec = Field(default_factory=GuardSpec)
    alerts: AlertSpec = Field(default_factory=AlertSpec)

    @property
    def needs_store(self) -> bool:
        return self.cache.enabled or self.rag.index is not None

    @property
    def any_step(self) -> bool:
        return self.needs_store or self.guard.policy != "off"


def load_app_config(path: str | Path | None = None, *, cache: bool | None = None, rag: str | None = None,
                    guard: str | None = None, store: str | None = None, embedder: str | None = None,
                    alerts: dict | None = None) -> AppConfig:
    """The config file (if any) with the command-line flags on top of it (a flag wins); `alerts`:
    the --alert* flags that were given, as keys of the alerts section."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"serve config file not found: {path}", param="config")
    tree = load_yaml(path) if path is not None else {}
    for key in ("cache", "rag", "guard", "alerts"):
        tree.setdefault(key, {})
        if not isinstance(tree[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping, got {tree[key]!r}")
    if cache is not None:
        tree["cache"]["enabled"] = cache
    if rag is not None:
        tree["rag"]["index"] = rag
    if guard is not None:
        tree["guard"]["policy"] = guard
    if store is not None:
        tree["store"] = store
    if embedder is not None:
        tree["embedder"] = embedder
    tree["alerts"].update({k: v for k, v in (alerts or {}).items() if v is not None})
    try:
        return from_dict(AppConfig, tree)
    except ConfigError as e:
        raise ConfigError(f"{path or 'serve config'}: {e.message}", param=e.param) from None


def default_state_dir() -> Path:
    """One embedded store per user, shared by `genforge rag` and every `genforge serve`: an index
    ingested once is found by any server (cache entries are keyed by model name and version)."""
    return Path.home() / ".cache" / "genforge" / "serve-state"
