"""FID / KID / memorisation / coverage / PCA+GMM baseline on synthetic features and real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genforge.common.errors import DataError
from genforge.eval.image import (
    PCAGMMSampler,
    class_accuracy,
    fid,
    fid_with_ci,
    kid,
    kid_with_ci,
    mode_coverage,
    nearest_distances,
    per_class_accuracy,
)


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    rs = np.random.default_rng(0)
    mix = rs.normal(size=(16, 16))
    return rs.normal(size=(600, 16)) @ mix / 4  # correlated, about unit variance, like real features


def test_fid_of_a_set_against_itself_is_zero(feats):
    assert fid(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_added_noise(feats):
    rs = np.random.default_rng(1)
    noise = rs.normal(size=feats.shape)
    values = [fid(feats, feats + s * noise) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-6)
    assert values == sorted(values) and values[-1] > 10 * values[1] > 0


def test_fid_matches_closed_form_for_shifted_gaussians():
    rs = np.random.default_rng(2)
    a = rs.normal(size=(4000, 4))
    # same covariance, mean shifted by 3 in one coordinate: FID ~ 9
    assert fid(a, a + np.array([3.0, 0, 0, 0])) == pytest.approx(9.0, rel=1e-6)
    # independent samples of one law: FID is small but positive (the small-n bias)
    assert 0 < fid(a[:2000], a[2000:]) < 0.05


def test_sqrtm_and_eigh_forms_agree(feats):
    from genforge.eval.image import _sym_sqrt, fid_from_stats, fid_from_stats_eigh, gaussian_stats

    rs = np.random.default_rng(6)
    a, b = gaussian_stats(feats[:300]), gaussian_stats(feats[300:] + 0.3 * rs.normal(size=(300, 16)))
    exact = fid_from_stats(*a, *b)
    assert fid_from_stats_eigh(*a, b[0], _sym_sqrt(b[1]), float(np.trace(b[1]))) == pytest.approx(exact, rel=1e-6)


def test_fid_survives_singular_covariance():
    rs = np.random.default_rng(3)
    a = rs.normal(size=(10, 32))  # n < d: rank-deficient covariance
    assert np.isfinite(fid(a, rs.normal(size=(10, 32))))


def test_kid_is_zero_in_expectation_and_grows_with_noise(feats):
    # KID compares independent draws, so the two sets are disjoint halves
    rs = np.random.default_rng(4)
    a, b = feats[:300], feats[300:]
    assert kid(a, a) == pytest.approx(kid(a, a))
    values = [kid(a, b + s * rs.normal(size=b.shape)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 0.2 * values[2]
    assert values[1:] == sorted(values[1:]) and values[1] > 0


def test_bootstrap_intervals_bracket_the_value(feats):
    rs = np.random.default_rng(5)
    cand = feats[:300] + 1.0 * rs.normal(size=(300, feats.shape[1]))
    f = fid_with_ci(cand, feats[300:], n_boot=50)
    k = kid_with_ci(cand, feats[300:], n_boot=50)
    for iv in (f, k):
        assert iv.low < iv.high
        assert iv.low <= iv.value * 1.5 and iv.high >= iv.value * 0.5
    assert f.value == pytest.approx(fid(cand, feats[300:]))
    assert k.value == pytest.approx(kid(cand, feats[300:]))
    assert set(f.as_dict("fid")) == {"fid", "fid_low", "fid_high"}


def test_bad_feature_shapes_are_rejected(feats):
    with pytest.raises(DataError, match="same d"):
        fid(feats, feats[:, :3])
    with pytest.raises(DataError, match="at least"):
        kid(feats[:1], feats)


def test_nearest_distance_is_zero_for_copies_and_grows():
    rs = torch.Generator().manual_seed(0)
    train = torch.rand(50, 1, 8, 8, generator=rs) * 2 - 1
    d_copy = nearest_distances(train[:10], train)
    assert np.allclose(d_copy, 0)
    d_noisy = nearest_distances(train[:10] + 0.1 * torch.randn(10, 1, 8, 8, generator=rs), train)
    assert (d_noisy > 0).all() and np.median(d_noisy) == pytest.approx(0.1, rel=0.3)


def test_accuracy_and_coverage():
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    assert class_accuracy(pred, np.array([0, 0, 1, 2, 2, 2, 2, 2])) == pytest.approx(7 / 8)
    assert per_class_accuracy(pred, pred, 4)[:3] == [1.0, 1.0, 1.0]
    assert mode_coverage(pred, 4) == pytest.approx(0.75)
    assert mode_coverage(np.zeros(100, dtype=int), 10) == pytest.approx(0.1)
    # a model trained without class 3 is scored on the classes it saw
    assert mode_coverage(pred, 4, classes=[0, 1, 2]) == pytest.approx(1.0)
    # a single stray prediction among 1000 does not count as covering a class
    assert mode_coverage(np.r_[np.zeros(999, dtype=int), [1]], 2) == pytest.approx(0.5)


def test_pca_gmm_baseline_samples_requested_classes():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images / 8.0 - 1.0).float()[:, None]
    labels = torch.from_numpy(d.target)
    keep = (labels == 3) | (labels == 4)
    images, labels = images[keep], labels[keep]
    base = PCAGMMSampler(n_components=16, mixture_components=2).fit(images, labels)
    x = base.sample(20, labels=[3] * 20, seed=1)
    assert x.shape == (20, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, base.sample(20, labels=[3] * 20, seed=1))
    # class 3 samples are closer to the mean 3 than to the mean 4
    m3, m4 = images[labels == 3].mean(0), images[labels == 4].mean(0)
    assert ((x - m3) ** 2).mean() < ((x - m4) ** 2).mean()
    assert base.sample(5, seed=2).shape == (5, 1, 8, 8)
