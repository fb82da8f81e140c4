"""A keyed invisible watermark for small images, and its detector (zero-bit: "is this key's mark there?").

Why not `invisible-watermark` (the DWT-DCT mark SDXL uses): its encoder refuses images under 256 x 256
pixels (`r * c < 256 * 256` -> "image too small"), and genforge's images are 8-64 px a side (a 16 x 16
digit is 256 pixels, 256x fewer). Its payload (48 bits in 4 x 4 blocks of the wavelet band) would not fit
either. So the mark is ours, kept small:

* The key seeds a +/-1 pattern P over 2-D DCT indices (u, v) < 64. The orthonormal DCT coefficient at
  (u, v) measures the same continuous cosine at every image size, so a resized image keeps its low-index
  coefficients (rescaled, same sign): the detector needs no search over sizes for a resize.
* Embedding moves the cheapest band coefficients (the smallest change, low frequencies preferred since
  JPEG and downscaling keep them) until enough of them agree in sign with P by a margin, then clips to
  [0, 255], rounds, and repeats (a black background clips away negative changes). Strength is the
  detection z it aims for; the measured PSNR and FID cost are in benchmarks/labelling_images.py. A second
  target makes the indices below side/2 reach a z of their own, so an image halved in size keeps the mark
  (on by default from 32 px a side, where it is nearly free; see InvisibleMark.half_z).
* Detection: of the n nonzero band coefficients, k agree in sign with P. Without this key's mark each
  agreement is a fair coin (the key's pattern is independent of the image), so k ~ Binomial(n, 1/2)
  exactly: z = (2k - n) / sqrt(n), p = the binomial tail. A crop is padded back with black (the digits'
  background) into candidate original sizes and offsets; every (size, offset, band) hypothesis counts in
  a Bonferroni correction, so the reported p-value stays an upper bound on the false-positive rate.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from genforge.common.errors import ConfigError

PATTERN_SIDE = 64  # DCT indices the key's pattern covers; larger images use its top-left 64 x 64 block
BANDS = (8, 16, 24, 32, 48, 64)  # band sides the detector tries (an image of side N has at most N)
CROP_SIDES = (0.95, 0.9, 0.866, 0.8)  # per-side share a crop kept (0.95 ~ 90% of the area, 0.866 ~ 75%)
MAX_OFFSETS = 7  # offsets tried per axis for each crop size (all of them for small images)
DETECT_P = 1e-4  # verdict "watermarked" below this (Bonferroni-corrected) p-value


@dataclass(frozen=True)
class InvisibleMark:
    """A key and how strongly to mark. `target_z`: the detection z the embedder aims for on the image as
    written (higher survives more processing, costs more distortion); `margin`: how far past zero (DCT units,
    pixel scale 0-255) a coefficient is pushed, so JPEG noise does not flip it back."""

    key: str
    target_z: float = 7.0
    margin: float = 8.0  # 6: PSNR +2 dB but JPEG q75 survival 95% -> 30% on 16 px digits (measured)
    low_bias: float = 3.0  # cost multiplier at the band's highest frequency (1 = no preference)
    # The z the band a 0.5x downscale keeps reaches on its own. None: 5.0 where the halved image is at least
    # 16 px a side (measured on 32 px digits: resize-0.5x detection 60% -> 100% for 0.3 dB PSNR), off below
    # (on 16 px digits the same target costs 9 dB PSNR: 28.4 -> 19.5). 0: off.
    half_z: float | None = None

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key.strip():
            raise ConfigError("watermark key is empty; give a non-empty key (--watermark KEY or a key file)",
                              param="watermark")


def key_pattern(key: str) -> np.ndarray:
    """The key's +/-1 pattern over DCT indices, PATTERN_SIDE x PATTERN_SIDE (sha256 of the key seeds it)."""
    seed = int.from_bytes(hashlib.sha256(b"genforge-image-mark\0" + key.encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng(seed).integers(0, 2, (PATTERN_SIDE, PATTERN_SIDE)).astype(np.int8) * 2 - 1


def _band(side: int) -> np.ndarray:
    """Boolean side x side mask of the band: every index but DC."""
    m = np.ones((side, side), dtype=bool)
    m[0, 0] = False
    return m


def luminance(arr: np.ndarray) -> np.ndarray:
    """uint8 H x W or H x W x C -> float H x W (ITU-R 601 luma for colour, as PIL's "L")."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 2:
        return a
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.shape[-1] == 1:
        return a[..., 0]
    return a @ np.array([0.299, 0.587, 0.114])


def _half_band(side: int) -> int:
    """The band a 0.5x downscale keeps: an image of side/2 px has the DCT indices below side/2."""
    half = side // 2
    return half if half >= 4 else 0


def embed_mark(arr: np.ndarray, mark: InvisibleMark, max_iter: int = 12) -> tuple[np.ndarray, dict]:
    """Mark a uint8 image (H x W, or H x W x C: the same change on every colour channel); returns the marked
    uint8 image and {"z": detection z on the result, "psnr": dB}.

    Two targets: the whole band reaches `target_z`, and the band a 0.5x downscale keeps (indices below
    side/2) reaches `half_z` on its own, so a halved image still carries the mark (without the second
    target the cheapest coefficients are high frequencies, and a halved 16 px digit detected 0%, measured).
    """
    from scipy.fft import dctn, idctn

    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ConfigError(f"embed_mark takes a uint8 H x W (x C) image, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    side = min(h, w, PATTERN_SIDE)
    if side < 4:
        return arr, {"z": 0.0, "psnr": math.inf}
    band = _band(side)
    p = key_pattern(mark.key)[:side, :side][band].astype(np.float64)
    uu, vv = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    freq_cost = 1.0 + (mark.low_bias - 1.0) * ((uu + vv) / (2.0 * (side - 1)))[band]
    half = _half_band(side)
    half_z = mark.half_z if mark.half_z is not None else (5.0 if half >= 16 else 0.0)
    targets = [(np.ones(int(band.sum()), dtype=bool), mark.target_z)]
    if half and half_z > 0:
        targets.insert(0, (((uu < half) & (vv < half))[band], half_z))
    gray = luminance(arr)
    x = gray.copy()
    for _ in range(max_iter):
        c = dctn(x, norm="ortho")
        block = c[:side, :side]
        cb = block[band]
        done = True
        for within, z in targets:
            agree = p * cb
            n = int(within.sum())
            short = math.ceil((n + z * math.sqrt(n)) / 2) - int((agree[within] >= mark.margin).sum())
            if short <= 0:
                continue
            done = False
            # The cheapest coefficients first; a few more than needed, since clipping undoes some of each round.
            cost = np.where(within & (agree < mark.margin), (mark.margin - agree) ** 2 * freq_cost, np.inf)
            pick = np.argsort(cost)[: min(n, short + max(2, short // 4))]
            pick = pick[np.isfinite(cost[pick])]
            cb[pick] += p[pick] * (mark.margin * 1.25 - agree[pick])
        if done:
            break
        block[band] = cb
        x = np.clip(np.rint(idctn(c, norm="ortho")), 0, 255)
    delta = x - gray
    out = arr.astype(np.float64) + (delta if arr.ndim == 2 else delta[..., None])
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mse = float(np.mean((out.astype(np.float64) - arr) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    z, _ = _score(luminance(out), p, side, band)
    return out, {"z": z, "psnr": psnr}


def _score(x: np.ndarray, p: np.ndarray | None, side: int, band: np.ndarray, key: str | None = None
           ) -> tuple[float, float]:
    """(z, one-sided p) of the sign agreement of x's band (of `side`) with the pattern."""
    from scipy.fft import dctn

    if p is None:
        p = key_pattern(key)[:side, :side][band]
    k, n = _agreement(dctn(x, norm="ortho")[:side, :side][band], p)
    (pv,), (z,) = _tails(np.array([k]), np.array([n]))
    return z, pv


def _agreement(cb: np.ndarray, p: np.ndarray) -> tuple[int, int]:
    """(k, n): of the n nonzero coefficients, k agree in sign with the pattern."""
    nonzero = np.abs(cb) > 1e-9
    return int((np.sign(cb[nonzero]) == np.sign(p[nonzero])).sum()), int(nonzero.sum())


def _tails(k: np.ndarray, n: np.ndarray) -> tuple[list[float], list[float]]:
    """One-sided binomial p-values and z-scores for arrays of (k, n), in one call (scipy.stats' per-call
    overhead was most of the detector's time when it ran once per band and canvas)."""
    from scipy.stats import binom

    n_safe = np.maximum(n, 1)
    pv = np.where(n > 0, binom.sf(k - 1, n_safe, 0.5), 1.0)
    z = np.where(n > 0, (2 * k - n) / np.sqrt(n_safe), 0.0)
    return [float(v) for v in pv], [float(v) for v in z]


def _band_counts(x: np.ndarray, pattern: np.ndarray) -> list[tuple[int, int, int]]:
    """(k, n, band side) for every band side of every image in x (... x H x W), from one batched DCT."""
    from scipy.fft import dctn

    sides = _bands_for(*x.shape[-2:])
    if not sides:
        return []
    c = dctn(x.reshape(-1, *x.shape[-2:]), norm="ortho", axes=(-2, -1))
    out = []
    for img in range(c.shape[0]):
        out += [(*_agreement(c[img, :s, :s][_band(s)], pattern[:s, :s][_band(s)]), s) for s in sides]
    return out


def _score_bands(x: np.ndarray, pattern: np.ndarray) -> list[tuple[float, float, int]]:
    """(p, z, band side) for every band side the image has."""
    counts = _band_counts(x, pattern)
    if not counts:
        return []
    pv, z = _tails(np.array([k for k, _, _ in counts]), np.array([n for _, n, _ in counts]))
    return list(zip(pv, z, [s for _, _, s in counts]))


def _bands_for(h: int, w: int) -> list[int]:
    top = min(h, w, PATTERN_SIDE)
    return sorted({b for b in BANDS if b <= top} | {top}) if top >= 4 else []


def _offsets(span: int) -> list[int]:
    if span <= 0:
        return [0]
    if span + 1 <= MAX_OFFSETS:
        return list(range(span + 1))
    return sorted({round(i * span / (MAX_OFFSETS - 1)) for i in range(MAX_OFFSETS)})


def detect_mark(arr: np.ndarray, key: str, p_threshold: float = DETECT_P) -> dict:
    """Is `key`'s mark in this image (uint8 H x W or H x W x C)? {"z_score", "p_value", "verdict", "hypothesis"}.

    Two families of hypotheses, each with half of the error budget (Bonferroni): the image as it is (every
    band side), and the image as a crop of a larger one (padded back with black at candidate sizes and
    offsets); the second is only searched when the first finds nothing.
    """
    from scipy.stats import norm

    if not isinstance(key, str) or not key.strip():
        raise ConfigError("watermark key is empty; give the key the images were marked with", param="key")
    pattern = key_pattern(key)
    x = luminance(arr)
    h, w = x.shape

    as_is = _score_bands(x, pattern)
    best_p, best_z, best_side = min(as_is) if as_is else (1.0, 0.0, 0)
    p_final = min(1.0, best_p * len(as_is) * 2) if as_is else 1.0
    hypothesis = {"crop": None, "band": best_side}
    if p_final >= p_threshold and min(h, w) >= 4:
        counts, where = [], []
        for share in CROP_SIDES:
            H, W = round(h / share), round(w / share)
            if (H, W) == (h, w):
                continue
            places = [(dy, dx) for dy in _offsets(H - h) for dx in _offsets(W - w)]
            canvases = np.zeros((len(places), H, W))
            for i, (dy, dx) in enumerate(places):
                canvases[i, dy:dy + h, dx:dx + w] = x
            per_canvas = len(_bands_for(H, W))
            counts += _band_counts(canvases, pattern)
            where += [(H, W, dy, dx) for dy, dx in places for _ in range(per_canvas)]
        if counts:
            pv, z = _tails(np.array([k for k, _, _ in counts]), np.array([n for _, n, _ in counts]))
            crops = [(pv[i], z[i], counts[i][2], where[i]) for i in range(len(counts))]
            cp, cz, cside, where = min(crops)
            c_final = min(1.0, cp * len(crops) * 2)
            if c_final < p_final:
                p_final, best_z = c_final, cz
                hypothesis = {"crop": {"original_size": list(where[:2]), "offset": list(where[2:])}, "band": cside}
    z_final = float(norm.isf(p_final)) if p_final < 0.5 else 0.0
    return {"z_score": round(z_final, 3), "p_value": p_final, "raw_z": round(float(best_z), 3),
            "verdict": "watermarked" if p_final < p_threshold else "not_watermarked", "hypothesis": hypothesis}
