"""A keyed green-list watermark for generated text (Kirchenbauer et al. 2023, "A Watermark for Large
Language Models") and its detector.

At each step the previous token and a secret 64-bit key pick a "green" share `gamma` of the
vocabulary; the sampler adds `delta` to the green tokens' logits (models/sampling.py). Text written
that way holds far more green tokens than the `gamma` share chance gives, which a one-proportion
z-test shows; text written without the key (by a person, another model, or this one unwatermarked)
scores z ~ 0.

The green list of (key, previous token) is a window of a per-key random table: table[j] is green
iff a splitmix64 hash of (key, j) falls below gamma * 2**32 (j < PERIOD = 2**18), and the previous
token picks the window's start s = hash(key, prev) mod PERIOD; token t is green iff
table[(t + s) mod PERIOD]. Windows at different starts overlap by gamma**2 of the vocabulary, as
independent lists would, and every list holds a gamma share. Why a window and not a hash of (key,
prev, token) per candidate (this module's first version): the decode step then adds a slice of a
cached table per row (one pass over the logits) instead of hashing the whole vocabulary per row,
which cost 24% of the 1M-parameter LM's decode throughput at 16 rows and 31 ms per step at a 152k
vocabulary (benchmarks/labelling.py measures the step, and transformers' WatermarkLogitsProcessor,
which seeds a torch.Generator and draws a `randperm` of the vocabulary per row and step). It needs
no RNG state, so rows with different keys (per-request keys of a multi-tenant deployment) share the
batched decode step. The detector needs no table: it hashes each (key, j) point it scores.

Detection re-tokenises the text (no special tokens) and scores every position t >= 1 with the
token before it; a repeated (previous, token) pair counts once, as Kirchenbauer et al. advise
(repeated n-grams would otherwise inflate z). Below `min_tokens` scored tokens the verdict is
"too_short": never a guess.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genforge.common.errors import ConfigError, GenforgeError

SCHEME = "kgw-green-list"
KEY_ENV = "GENFORGE_WATERMARK_KEY"
DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
DEFAULT_Z_THRESHOLD = 4.0
# Fewest scored tokens a verdict needs. benchmarks/labelling.py measures where detection reaches 95% at
# 1% false positives on genforge's own LM: 32 tokens (README: "Labelling: text watermark"); below that a
# z-score is too noisy to be worth a verdict.
DEFAULT_MIN_TOKENS = 32

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit unsigned constant as the int64 torch stores (the same bits)."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)
_LOW32 = (1 << 32) - 1


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping multiplies; shifts masked to logical shifts)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _C1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _C2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


# The window table's period: windows of a vocabulary larger than this repeat the pattern (harmless).
PERIOD = 1 << 18
_KEY_SALT = _signed(0xD6E8FEB86659FD93)


def _starts(keys: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[n] int64 in [0, PERIOD): where (key, previous token)'s window starts in the key's table."""
    return _mix(keys ^ _mix(prev * _GOLDEN + _GOLDEN)) & (PERIOD - 1)


def _table_green(keys: torch.Tensor, j: torch.Tensor, gamma: float) -> torch.Tensor:
    """bool, keys and j broadcast: whether entry j of each key's table is green."""
    return (_mix(_mix(keys ^ _KEY_SALT) ^ _mix(j * _C2 + _C1)) & _LOW32) < int(round(gamma * 2 ** 32))


def is_green(keys: torch.Tensor, prev: torch.Tensor, tokens: torch.Tensor, gamma: float) -> torch.Tensor:
    """bool [m]: whether tokens[i] is green after prev[i] under keys[i] (the detector's pointwise test)."""
    return _table_green(keys, (tokens + _starts(keys, prev)) & (PERIOD - 1), gamma)


def green_mask(keys: torch.Tensor, prev: torch.Tensor, vocab: int, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """bool [n, vocab]: which candidate tokens are green for each row's (key, previous token)."""
    tokens = torch.arange(vocab, dtype=torch.int64, device=keys.device)[None, :]
    return _table_green(keys[:, None], (tokens + _starts(keys, prev)[:, None]) & (PERIOD - 1), gamma)


def _mix_py(z: int) -> int:
    """`_mix` on one Python integer (unsigned)."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _start_py(key: int, prev: int) -> int:
    """`_starts` of one row in Python integers: cheaper than a torch call per row and decode step."""
    return _mix_py(key ^ _mix_py(prev * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15)) & (PERIOD - 1)


class _TableArena:
    """The green tables of the live keys, one row each, in one tensor: so any mix of keys in a batch costs
    one gather and one add per decode step (a tensor per key cost an add per key: 16 keys, one per row,
    took 0.40 ms a step against 0.14 ms for one key at a 4k vocabulary, measured). A row is its key's 0/1
    table, in the logits' dtype, repeated to PERIOD + vocab entries, so window [s, s + vocab) is the green
    list of start s and never crosses into the next row. At most MAX_KEYS rows (least recently used goes):
    ~1 MB + 4 B per vocabulary entry each in float32."""

    MAX_KEYS = 16

    def __init__(self, vocab: int, device: torch.device, dtype: torch.dtype) -> None:
        self.row_len = PERIOD + vocab
        self.data = torch.empty(0, self.row_len, device=device, dtype=dtype)
        self.slots: OrderedDict[tuple[int, float], int] = OrderedDict()  # (key, gamma) -> row, LRU order

    def slot(self, key: int, gamma: float) -> int:
        """The row holding (key, gamma)'s table, filled on first use."""
        k = (key, gamma)
        row = self.slots.get(k)
        if row is None:
            if len(self.slots) < self.MAX_KEYS:
                row = len(self.slots)
                if row == self.data.shape[0]:  # grow by doubling: most deployments use one key
                    grown = torch.empty(min(self.MAX_KEYS, max(1, 2 * row)), self.row_len,
                                        device=self.data.device, dtype=self.data.dtype)
                    grown[:row] = self.data
                    self.data = grown
            else:
                _, row = self.slots.popitem(last=False)
            j = torch.arange(PERIOD, dtype=torch.int64, device=self.data.device)
            base = _table_green(torch.tensor(_signed(key), device=self.data.device), j, gamma).to(self.data.dtype)
            self.data[row] = base.repeat(-(-self.row_len // PERIOD))[: self.row_len]
            self.slots[k] = row
        self.slots.move_to_end(k)
        return row


_ARENAS: dict[tuple[int, str, torch.dtype], _TableArena] = {}  # per (vocab, device, dtype): a model's shape


def add_green_bias(logits: torch.Tensor, rows: list[int], marks: list[TextWatermark], prev: list[int]) -> None:
    """In place: logits[rows[i]] += marks[i].delta on the green list of (marks[i].key, prev[i]).

    One gather of every row's window (whatever their keys) and one add."""
    n, vocab = logits.shape
    arena = _ARENAS.get((vocab, str(logits.device), logits.dtype))
    if arena is None:
        arena = _ARENAS[(vocab, str(logits.device), logits.dtype)] = _TableArena(vocab, logits.device, logits.dtype)
    at = [arena.slot(wm.key, wm.gamma) * arena.row_len + _start_py(wm.key, p) for wm, p in zip(marks, prev)]
    bonus = arena.data.view(-1).unfold(0, vocab, 1).index_select(0, torch.tensor(at, device=logits.device))
    deltas = [wm.delta for wm in marks]
    if len(set(deltas)) > 1:
        bonus.mul_(torch.tensor(deltas, dtype=logits.dtype, device=logits.device)[:, None])
    elif rows == list(range(n)):  # every row, one delta: the common case, one add
        logits.add_(bonus, alpha=deltas[0])
        return
    else:
        bonus.mul_(deltas[0])
    logits.index_add_(0, torch.tensor(rows, device=logits.device), bonus)


# ---------------------------------------------------------------- the key and the configuration


def key_from(value: str | int) -> int:
    """A 64-bit key from a secret string (sha256's first 8 bytes) or an integer (taken mod 2**64)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value & _M64
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("watermark key: empty; give a non-empty secret string", param="watermark")
    return int.from_bytes(hashlib.sha256(value.strip().encode("utf-8")).digest()[:8], "little")


def key_id_of(key: int) -> str:
    """A short public fingerprint of a key: safe to print and to send in responses (never the key)."""
    return hashlib.sha256(b"genforge-watermark-key-id:" + (key & _M64).to_bytes(8, "little")).hexdigest()[:8]


def read_key_file(path: str | Path) -> str:
    """The secret in a key file: its first line that is neither blank nor a # comment."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--watermark-key-file {path}: cannot read it ({e.strerror})",
                          param="watermark_key_file") from None
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ConfigError(f"--watermark-key-file {path}: the file holds no key (put the secret on one line)",
                      param="watermark_key_file")


def resolve_key(flag_value: str | None, key_file: str | None = None, env: str = KEY_ENV,
                environ: dict[str, str] | None = None) -> int | None:
    """The deployment's key: --watermark KEY, else --watermark-key-file, else the environment variable
    `env`; None when none is given (watermarking off). An empty value is an error, never "off"."""
    if flag_value is not None and key_file is not None:
        raise ConfigError("--watermark and --watermark-key-file: give one of them", param="watermark")
    if flag_value is not None:
        if not flag_value.strip():
            raise ConfigError("--watermark: the key is empty; give a secret string (or leave the flag out)",
                              param="watermark")
        return key_from(flag_value)
    if key_file is not None:
        return key_from(read_key_file(key_file))
    environ = os.environ if environ is None else environ
    if env in environ:
        if not environ[env].strip():
            raise ConfigError(f"{env} is set but empty; give a secret string or unset it", param="watermark")
        return key_from(environ[env])
    return None


@dataclass(frozen=True)
class TextWatermark:
    """The watermark one row is sampled with: a 64-bit key, the green share and the logit bonus."""

    key: int
    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if isinstance(self.key, bool) or not isinstance(self.key, int) or not 0 <= self.key <= _M64:
            raise ConfigError("watermark key: expected a 64-bit unsigned integer (use key_from for a string)",
                              param="watermark")
        g, d = self.gamma, self.delta
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 < g < 1.0:
            raise ConfigError(f"--watermark-gamma: the green share must be in (0, 1), got {g}",
                              param="watermark_gamma")
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d >= 0):
            raise ConfigError(f"--watermark-delta: the logit bonus must be a finite number >= 0, got {d}",
                              param="watermark_delta")

    @classmethod
    def from_secret(cls, secret: str | int, **kw: float) -> TextWatermark:
        return cls(key_from(secret), **kw)

    @property
    def key_id(self) -> str:
        return key_id_of(self.key)

    @property
    def signed_key(self) -> int:
        """The key as the int64 torch holds."""
        return _signed(self.key)

    def describe(self) -> dict[str, Any]:
        """The public description a watermarked deployment sends with each response."""
        return {"scheme": SCHEME, "gamma": self.gamma, "delta": self.delta, "key_id": self.key_id}

    def header(self) -> str:
        """The value of the x-genforge-watermark response header."""
        return f"kgw; gamma={self.gamma:g}; delta={self.delta:g}; key-id={self.key_id}"


# ---------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    z_score: float
    p_value: float
    scored_tokens: int
    green_tokens: int
    verdict: str  # "watermarked" | "not_watermarked" | "too_short"
    min_tokens: int
    key_id: str
    z_threshold: float

    @property
    def green_fraction(self) -> float:
        return self.green_tokens / self.scored_tokens if self.scored_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"z_score": self.z_score, "p_value": self.p_value, "scored_tokens": self.scored_tokens,
                "green_tokens": self.green_tokens, "green_fraction": self.green_fraction, "verdict": self.verdict,
                "min_tokens": self.min_tokens, "z_threshold": self.z_threshold, "key_id": self.key_id}

    def summary(self) -> str:
        """One line for a terminal."""
        if self.verdict == "too_short":
            return (f"too_short: {self.scored_tokens} scored tokens, fewer than the {self.min_tokens} a verdict "
                    f"needs (key-id {self.key_id})")
        line = (f"{self.verdict}: z={self.z_score:.2f} p={self.p_value:.2e} scored={self.scored_tokens} "
                f"green={self.green_fraction:.2f}")
        if self.verdict == "not_watermarked":
            line += f" no watermark for this key (key-id {self.key_id})"
        return line


def p_value(z: float) -> float:
    """One-sided: the chance of a z at least this high in unwatermarked text."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def check_min_tokens(min_tokens: Any, param: str = "min_tokens") -> int:
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise GenforgeError(f"{param}: expected an integer >= 1, got {min_tokens!r}", param=param)
    return min_tokens


def green_counts(ids: list[int], wm: TextWatermark) -> tuple[int, int]:
    """(scored, green) over the unique (previous, token) pairs of `ids`."""
    pairs = list(dict.fromkeys(zip(ids[:-1], ids[1:])))
    if not pairs:
        return 0, 0
    t = torch.tensor(pairs, dtype=torch.int64)
    keys = torch.full((len(pairs),), wm.signed_key, dtype=torch.int64)
    return len(pairs), int(is_green(keys, t[:, 0], t[:, 1], wm.gamma).sum())


def score_ids(ids: list[int], wm: TextWatermark, min_tokens: int = DEFAULT_MIN_TOKENS,
              z_threshold: float = DEFAULT_Z_THRESHOLD) -> Detection:
    """The z-test of a token sequence for `wm`'s key and green share (delta plays no part)."""
    check_min_tokens(min_tokens)
    scored, green = green_counts(list(ids), wm)
    g = wm.gamma
    z = (green - g * scored) / math.sqrt(scored * g * (1 - g)) if scored else 0.0
    verdict = "too_short" if scored < min_tokens else ("watermarked" if z >= z_threshold else "not_watermarked")
    return Detection(z_score=z, p_value=p_value(z) if scored else 1.0, scored_tokens=scored, green_tokens=green,
                     verdict=verdict, min_tokens=min_tokens, key_id=wm.key_id, z_threshold=z_threshold)


def detect_text(text: str, tokenizer: Any, wm: TextWatermark, min_tokens: int = DEFAULT_MIN_TOKENS,
                z_threshold: float = DEFAULT_Z_THRESHOLD) -> Detection:
    """`score_ids` of the text's tokens under `tokenizer` (the generating model's), without special tokens."""
    if not isinstance(text, str):
        raise GenforgeError(f"text: expected a string, got {type(text).__name__}", param="text")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return score_ids(ids, wm, min_tokens, z_threshold)
