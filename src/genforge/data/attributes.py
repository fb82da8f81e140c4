"""Attributes measured from the pixels of digit-like images: stroke thickness, slant and size, and
their three levels (tertiles). Works on any uint8 images with ink bright on dark, so eval measures
generated images exactly as `genforge data prepare` measured the training set (data/captions.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from genforge.common.errors import DataError

__all__ = ["ATTRIBUTE_LEVELS", "attribute_bins", "measure_attributes", "tertile_edges"]

# Levels in increasing order of the measure; bins are tertiles of the training split.
ATTRIBUTE_LEVELS: dict[str, tuple[str, str, str]] = {
    "thickness": ("thin", "medium", "thick"),
    "slant": ("left", "upright", "right"),
    "size": ("small", "medium", "large"),
}
INK_THRESHOLD = 128  # a pixel is ink at half intensity or more

def measure_attributes(images_uint8: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image float64 measures of uint8 images (N x 1 x H x W, N x H x W, or N x 3 x H x W as grey).

    thickness: stroke width in pixels, 4 * mean distance-to-background over the ink - 2 (exact for a
               straight band of even width w, w + 1/w for odd w).
    slant:     shear of the ink, cov(x, y) / var(y) with y pointing up: dx/dy of the strokes' lean,
               > 0 when the top leans right, 0 upright.
    size:      the ink's extent as a fraction of the image side: the geometric mean of its height and
               width, each the span between the 2% and 98% quantiles of the ink's mass along that
               axis divided by 0.96 (= the bounding box for evenly spread ink, but not thrown by a
               stray pixel). Not the height alone: the digits are all scaled to the full height.
    An image with no ink measures 0 on all three.
    """
    from scipy import ndimage

    x = np.asarray(images_uint8)
    if x.dtype != np.uint8:
        raise DataError(f"measure_attributes wants uint8 images (0..255, ink bright), got {x.dtype}; "
                        "convert [-1, 1] floats with genforge.data.images.to_uint8")
    if x.ndim == 4:
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if x.ndim != 3:
        raise DataError(f"measure_attributes wants N x C x H x W or N x H x W images, got shape {x.shape}")
    n, h, w = x.shape
    ink = x >= INK_THRESHOLD
    weight = np.where(ink, x / 255.0, 0.0)
    mass = weight.sum(axis=(1, 2))
    has_ink = mass > 0
    safe = np.where(has_ink, mass, 1.0)

    thickness = np.zeros(n)
    for i in np.flatnonzero(has_ink):
        # padded so ink touching the border still has background beside it
        dist = ndimage.distance_transform_edt(np.pad(ink[i], 1))
        thickness[i] = 4.0 * dist.sum() / ink[i].sum() - 2.0

    ys = (h - 1) / 2.0 - np.arange(h, dtype=np.float64)  # up is positive
    xs = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    row_mass, col_mass = weight.sum(axis=2), weight.sum(axis=1)
    my = (row_mass @ ys) / safe
    mx = (col_mass @ xs) / safe
    dy = ys[None, :] - my[:, None]
    dx = xs[None, :] - mx[:, None]
    var_y = (row_mass * dy**2).sum(axis=1) / safe
    cov_xy = np.einsum("nhw,nh,nw->n", weight, dy, dx) / safe
    slant = np.where(var_y > 1e-9, cov_xy / np.maximum(var_y, 1e-9), 0.0)

    size = np.zeros(n)
    for i in np.flatnonzero(has_ink):
        size[i] = np.sqrt(_extent(row_mass[i], mass[i]) * _extent(col_mass[i], mass[i]) / (h * w))
    return {"thickness": thickness, "slant": np.where(has_ink, slant, 0.0), "size": size}


def _extent(profile: np.ndarray, mass: float) -> float:
    """Span between the 2% and 98% quantiles of a mass profile, / 0.96, in pixels (each pixel's mass
    spread evenly over it, so the span is continuous, not a whole number of pixels)."""
    cdf = np.concatenate([[0.0], np.cumsum(profile)]) / mass
    lo, hi = np.interp([0.02, 0.98], cdf, np.arange(len(profile) + 1, dtype=np.float64))
    return float(hi - lo) / 0.96


Edges = dict  # {attribute: [e1, e2]} or, per class, {attribute: {class_name: [e1, e2]}}


def tertile_edges(measures: dict[str, np.ndarray], mask: np.ndarray | None = None,
                  classes: Sequence[str] | None = None) -> Edges:
    """The 1/3 and 2/3 quantiles of each measure over `mask` (e.g. the training split); per class
    when `classes` (each image's class name) is given."""
    keep = np.ones(len(next(iter(measures.values()))), dtype=bool) if mask is None else np.asarray(mask, bool)

    def cuts(v: np.ndarray, m: np.ndarray) -> list[float]:
        return [float(q) for q in np.quantile(v[m], [1 / 3, 2 / 3])]

    if classes is None:
        return {k: cuts(v, keep) for k, v in measures.items()}
    names = np.asarray([str(c) for c in classes])
    return {k: {c: cuts(v, keep & (names == c)) for c in sorted(set(names[keep]))} for k, v in measures.items()}


def attribute_bins(measures: dict[str, np.ndarray], edges: Edges, classes: Sequence[str] | None = None
                   ) -> dict[str, list[str]]:
    """Level names per image: below or at the first edge -> low, at or below the second -> middle.

    Per-class edges (what builtin:digits-captions saves) need `classes`, each image's class name: a
    "thick seven" is thick for a seven. For generated images that is the class the prompt asked for.
    """
    out = {}
    for name, cuts in edges.items():
        if name not in ATTRIBUTE_LEVELS:
            raise DataError(f"unknown attribute {name!r} (known: {', '.join(ATTRIBUTE_LEVELS)})")
        values = np.asarray(measures[name], dtype=np.float64)
        if isinstance(cuts, dict):
            if classes is None or len(classes) != len(values):
                raise DataError(f"the {name} edges are per class: pass each image's class name (classes=)")
            missing = sorted({str(c) for c in classes} - set(cuts))
            if missing:
                raise DataError(f"no {name} edges for class {missing[0]!r} (edges for: {', '.join(cuts)})")
            per_image = np.array([cuts[str(c)] for c in classes], dtype=np.float64).reshape(len(values), 2)
        else:
            per_image = np.broadcast_to(np.asarray(cuts, dtype=np.float64), (len(values), 2))
        idx = (values > per_image[:, 0]).astype(int) + (values > per_image[:, 1])
        out[name] = [ATTRIBUTE_LEVELS[name][int(i)] for i in idx]
    return out
