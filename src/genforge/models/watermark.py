"""A keyed green-list watermark for generated text (Kirchenbauer et al. 2023, "A Watermark for Large
Language Models") and its detector.

At each step the previous token and a secret 64-bit key pick a "green" share `gamma` of the
vocabulary; the sampler adds `delta` to the green tokens' logits (models/sampling.py). Text written
that way holds far more green tokens than the `gamma` share chance gives, which a one-proportion
z-test shows; text written without the key (by a person, another model, or this one unwatermarked)
scores z ~ 0.

The green test is a pure integer hash of (key, previous token, candidate token), vectorised in
torch int64 (splitmix64's finalizer; `>>` on int64 is arithmetic, so every shift is masked to a
logical one): green iff its low 32 bits < gamma * 2**32. It needs no RNG state, so rows with
different keys (per-request keys of a multi-tenant deployment) get their biases in ONE batched
operation inside the continuous-batching decode step. transformers' WatermarkLogitsProcessor does
the same scheme differently: one key per `generate` call, and per row and step it seeds a
torch.Generator and draws a `randperm` of the vocabulary, a Python loop over the batch
(benchmarks/labelling.py measures both per step, 16 rows: 0.28 vs 0.42 ms at a 4k vocabulary, even at
32k, but 31 vs 14 ms at 152k, where its randperm beats our int64 hash: a cheaper hash is the open item).

Detection re-tokenises the text (no special tokens) and scores every position t >= 1 with the
token before it; a repeated (previous, token) pair counts once, as Kirchenbauer et al. advise
(repeated n-grams would otherwise inflate z). Below `min_tokens` scored tokens the verdict is
"too_short": never a guess.
"""

from __future__ import annotations

import hashlib
import math
import os
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


def _row_seed(keys: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """[n] int64: the hash state of (key, previous token) that picks that row's green list."""
    return _mix(keys ^ _mix(prev * _GOLDEN + _GOLDEN))


_TOKEN_HASH: dict[tuple[int, str], torch.Tensor] = {}


def _token_hash(vocab: int, device: torch.device) -> torch.Tensor:
    """[vocab] int64: every candidate token's own hash, computed once per vocabulary size and device."""
    k = (vocab, str(device))
    h = _TOKEN_HASH.get(k)
    if h is None:
        h = _TOKEN_HASH[k] = _mix(torch.arange(vocab, dtype=torch.int64, device=device) * _C2 + _C1)
    return h


def _threshold(gamma: float) -> int:
    return int(round(gamma * 2 ** 32))


def green_mask(keys: torch.Tensor, prev: torch.Tensor, vocab: int,
               gamma: float | torch.Tensor = DEFAULT_GAMMA) -> torch.Tensor:
    """bool [n, vocab]: which candidate tokens are green for each row's (key, previous token).

    `keys`, `prev`: int64 [n]; `gamma`: one green share, or [n] per row."""
    seed = _row_seed(keys, prev)[:, None]
    low = _mix(seed ^ _token_hash(vocab, keys.device)[None, :]) & _LOW32
    if isinstance(gamma, torch.Tensor):
        return low < (gamma.double() * 2 ** 32).round().long()[:, None]
    return low < _threshold(gamma)


def is_green(keys: torch.Tensor, prev: torch.Tensor, tokens: torch.Tensor, gamma: float) -> torch.Tensor:
    """bool [m]: whether tokens[i] is green after prev[i] under keys[i] (the detector's pointwise test)."""
    tok = _mix(tokens * _C2 + _C1)
    return (_mix(_row_seed(keys, prev) ^ tok) & _LOW32) < _threshold(gamma)


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
