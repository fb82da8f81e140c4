"""Image-generation metrics: FID, KID (with bootstrap intervals), memorisation, coverage, a baseline.

All feature-space metrics take plain float64 arrays (n, d), e.g. the penultimate layer of the
domain classifier (models/classifier.py); nothing here trains or samples a generative model.

* FID: Frechet distance of Gaussians fitted to two feature sets. Biased upward at small n, so
  only compare FIDs computed at the same n (the real-vs-real floor uses the same n).
* KID: unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3; ~0 for equal laws.
* Bootstrap intervals resample the candidate set and keep the reference fixed: they show how much
  the figure depends on which samples were drawn. A resample repeats samples, which inflates FID
  (fewer distinct points), so the FID interval is shifted back by that bias (median of the draws
  minus the estimate); KID skips pairs of the same source sample, so it needs no such shift.
* KID assumes the two sets are independent draws; a set and a noisy copy of the same points
  share their pairing and read too low.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

from genforge.common.errors import DataError


def _check(a: np.ndarray, b: np.ndarray, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DataError(f"feature sets must be (n, d) with the same d; got {a.shape} and {b.shape}")
    if len(a) < min_n or len(b) < min_n:
        raise DataError(f"need at least {min_n} samples per set; got {len(a)} and {len(b)}")
    return a, b


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    S1 S2 is not symmetric, so sqrtm may return tiny imaginary parts (dropped when negligible) or,
    for near-singular covariances (n < d), non-finite values; then both get eps on the diagonal.
    """
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            warnings.warn(f"FID: sqrtm has a large imaginary part ({imag:.3g}); the value may be unreliable",
                          stacklevel=2)
        covmean = covmean.real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_stats_eigh(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, sqrt_s2: np.ndarray, tr_s2: float) -> float:
    """The same FID through tr (S1 S2)^(1/2) = sum sqrt(eig(S2^(1/2) S1 S2^(1/2))): a symmetric PSD
    eigenproblem, ~50x cheaper than sqrtm, with S2^(1/2) computed once (bootstrap draws)."""
    diff = mu1 - mu2
    m = sqrt_s2 @ s1 @ sqrt_s2
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return max(float(diff @ diff + np.trace(s1) + tr_s2 - 2.0 * tr_covmean), 0.0)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _check(a, b)
    return fid_from_stats(*gaussian_stats(a), *gaussian_stats(b))


def poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _offdiag_mean(k: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Mean of k over pairs of *different* samples (for a bootstrap draw: different source indices)."""
    if idx is None:
        n = len(k)
        return float((k.sum() - np.trace(k)) / (n * (n - 1)))
    sub = k[np.ix_(idx, idx)]
    mask = idx[:, None] != idx[None, :]
    return float(sub[mask].mean()) if mask.any() else 0.0


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 between feature sets a and b with the cubic polynomial kernel."""
    a, b = _check(a, b)
    return _offdiag_mean(poly_kernel(a, a)) + _offdiag_mean(poly_kernel(b, b)) - 2 * float(poly_kernel(a, b).mean())


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self, name: str) -> dict[str, float]:
        return {name: self.value, f"{name}_low": self.low, f"{name}_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _percentiles(draws: list[float], level: float) -> tuple[float, float]:
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def fid_with_ci(cand: np.ndarray, ref: np.ndarray, *, n_boot: int = 100, level: float = 0.95,
                seed: int = 0) -> Interval:
    """FID of `cand` against `ref` with a bias-shifted percentile bootstrap interval over `cand`."""
    cand, ref = _check(cand, ref)
    mu_r, s_r = gaussian_stats(ref)
    value = fid_from_stats(*gaussian_stats(cand), mu_r, s_r)
    sqrt_r, tr_r = _sym_sqrt(s_r), float(np.trace(s_r))
    rs = np.random.default_rng(seed)
    draws = [fid_from_stats_eigh(*gaussian_stats(cand[rs.integers(0, len(cand), len(cand))]), mu_r, sqrt_r, tr_r)
             for _ in range(n_boot)]
    shift = float(np.median(draws)) - value
    lo, hi = _percentiles(draws, level)
    return Interval(value, max(0.0, lo - shift), max(0.0, hi - shift))


def kid_with_ci(cand: np.ndarray, ref: np.ndarray, *, n_boot: int = 200, level: float = 0.95,
                seed: int = 0) -> Interval:
    """KID of `cand` against `ref` with a bootstrap interval over `cand` (kernels computed once)."""
    cand, ref = _check(cand, ref)
    k_cc, k_rr, k_cr = poly_kernel(cand, cand), poly_kernel(ref, ref), poly_kernel(cand, ref)
    rr = _offdiag_mean(k_rr)
    value = _offdiag_mean(k_cc) + rr - 2 * float(k_cr.mean())
    rs = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rs.integers(0, len(cand), len(cand))
        draws.append(_offdiag_mean(k_cc, idx) + rr - 2 * float(k_cr[idx].mean()))
    return Interval(value, *_percentiles(draws, level))


def nearest_distances(samples: torch.Tensor, train: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """Per sample: RMS pixel distance (images in [-1, 1]) to its nearest training image.

    Divided by sqrt(pixels) so it reads the same at any image size; 0 means an exact copy.
    Compare it with the same figure for held-out real images: a generator that copies its
    training set sits well below that.
    """
    s = samples.reshape(len(samples), -1).double()
    t = train.reshape(len(train), -1).double()
    if s.shape[1] != t.shape[1]:
        raise DataError(f"sample images have {s.shape[1]} values, training images {t.shape[1]}")
    out = [torch.cdist(s[lo:lo + chunk], t).min(dim=1).values for lo in range(0, len(s), chunk)]
    return (torch.cat(out) / math.sqrt(s.shape[1])).numpy()


def class_accuracy(pred: np.ndarray, wanted: np.ndarray) -> float:
    pred, wanted = np.asarray(pred), np.asarray(wanted)
    return float((pred == wanted).mean()) if len(pred) else math.nan


def per_class_accuracy(pred: np.ndarray, wanted: np.ndarray, num_classes: int) -> list[float]:
    pred, wanted = np.asarray(pred), np.asarray(wanted)
    return [float((pred[wanted == c] == c).mean()) if (wanted == c).any() else math.nan
            for c in range(num_classes)]


def mode_coverage(pred: np.ndarray, num_classes: int, min_share: float = 0.25,
                  classes: list[int] | None = None) -> float:
    """Share of classes the samples cover: a class counts when it gets at least `min_share` of
    its fair share (1 / number of classes) of the predictions, so a single stray sample is not a
    mode. `classes`: the ones the model was trained on (default: all)."""
    pred = np.asarray(pred)
    classes = list(range(num_classes)) if classes is None else list(classes)
    if len(pred) == 0 or not classes:
        return 0.0
    counts = np.bincount(pred, minlength=num_classes)[classes]
    return float((counts / len(pred) >= min_share / len(classes)).mean())


class PCAGMMSampler:
    """Baseline generator: PCA of the pixels, then a Gaussian mixture per class in that space.

    Per class, so it can be asked for a class like the conditional models and its class accuracy
    means the same thing; with one class it is a plain PCA + GMM sampler.
    """

    def __init__(self, n_components: int = 32, mixture_components: int = 4, seed: int = 0):
        self.n_components, self.mixture_components, self.seed = n_components, mixture_components, seed
        self.pca = None
        self.mixtures: dict[int, object] = {}
        self.shape: tuple[int, ...] = ()

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> PCAGMMSampler:
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        x = images.reshape(len(images), -1).double().numpy()
        self.shape = tuple(images.shape[1:])
        y = np.zeros(len(x), dtype=np.int64) if labels is None else np.asarray(labels)
        self.pca = PCA(n_components=min(self.n_components, x.shape[1], len(x) - 1), random_state=self.seed)
        z = self.pca.fit_transform(x)
        for c in np.unique(y):
            zc = z[y == c]
            k = max(1, min(self.mixture_components, len(zc) // 10))
            self.mixtures[int(c)] = GaussianMixture(k, covariance_type="full", reg_covar=1e-4,
                                                    random_state=self.seed).fit(zc)
        return self

    def sample(self, n: int, labels: list[int] | None = None, seed: int = 0) -> torch.Tensor:
        if self.pca is None:
            raise DataError("PCAGMMSampler: call fit() first")
        classes = sorted(self.mixtures)
        rs = np.random.default_rng(seed)
        wanted = np.asarray(labels) if labels is not None else rs.choice(classes, size=n)
        z = np.zeros((n, self.pca.n_components_))
        for c in np.unique(wanted):
            idx = np.flatnonzero(wanted == c)
            gmm = self.mixtures[int(c)]
            gmm.random_state = int(rs.integers(2**31))  # sklearn's sample() draws from random_state
            draw, _ = gmm.sample(len(idx))
            z[idx] = draw[rs.permutation(len(idx))]  # sample() groups draws by component
        x = self.pca.inverse_transform(z)
        return torch.from_numpy(x).float().reshape(n, *self.shape).clamp(-1, 1)
