"""Attributes measured from pixels: synthetic strokes whose width, shear and size are known."""

from __future__ import annotations

import numpy as np
import pytest

from genforge.common.errors import DataError
from genforge.data.attributes import attribute_bins, measure_attributes, tertile_edges


def stroke(width: int = 4, slant: float = 0.0, height: int = 20, size: int = 32) -> np.ndarray:
    """A 1 x size x size uint8 image: a bar `width` pixels wide, `height` tall, sheared by `slant`
    (columns moved right by slant * height above the centre), ink 255 on 0."""
    rows = np.arange(size)[:, None] + 0.5  # pixel centres
    cols = np.arange(size)[None, :] + 0.5
    up = size / 2 - rows
    centre = size / 2 + 0.5 * (width % 2) + slant * up  # an odd width centred on a pixel
    ink = (np.abs(cols - centre) < width / 2) & (np.abs(up) < height / 2)
    return (ink * 255).astype(np.uint8)[None]


def square(side: int, size: int = 32) -> np.ndarray:
    img = np.zeros((1, size, size), np.uint8)
    lo = (size - side) // 2
    img[0, lo:lo + side, lo:lo + side] = 255
    return img


def test_thickness_is_the_stroke_width_in_pixels():
    widths = [2, 3, 4, 6, 8]
    m = measure_attributes(np.stack([stroke(width=w, height=28) for w in widths]))["thickness"]
    # exact along a band; a bar's ends lie near background, which thins a short fat bar a little
    np.testing.assert_allclose(m, widths, rtol=0.1)
    assert np.all(np.diff(m) > 0.5)
    # a sheared stroke drawn with the same horizontal run is a little thinner across (cos of its angle)
    slanted = measure_attributes(np.stack([stroke(width=4, height=28, slant=s) for s in (-0.3, 0.3)]))["thickness"]
    np.testing.assert_allclose(slanted, 4 / np.sqrt(1 + 0.3**2), rtol=0.1)


def test_slant_is_the_shear_of_the_ink():
    shears = [-0.4, -0.2, 0.0, 0.2, 0.4]
    m = measure_attributes(np.stack([stroke(width=3, slant=s) for s in shears]))["slant"]
    np.testing.assert_allclose(m, shears, atol=0.03)  # > 0: top leans right
    assert np.all(np.diff(m) > 0)


def test_size_is_the_ink_extent_and_ignores_stray_pixels():
    m = measure_attributes(np.stack([square(s) for s in (8, 16, 24)]))["size"]
    np.testing.assert_allclose(m, [0.25, 0.5, 0.75], atol=0.02)
    speck = square(16)
    speck[0, 0, 0] = 255  # one stray pixel far away: a bounding box would say 1.0
    assert abs(measure_attributes(speck[None])["size"][0] - 0.5) < 0.05


def test_measures_accept_grey_and_colour_and_blank_images():
    grey = np.stack([stroke(width=4, slant=0.2)])
    colour = np.repeat(grey, 3, axis=1)
    a, b = measure_attributes(grey), measure_attributes(colour)
    assert all(np.allclose(a[k], b[k]) for k in a)
    assert all(v[0] == 0 for v in measure_attributes(np.zeros((1, 1, 16, 16), np.uint8)).values())
    with pytest.raises(DataError, match="uint8"):
        measure_attributes(grey.astype(np.float32) / 255)


def test_bins_use_the_edges_low_middle_high():
    measures = {"thickness": np.array([1.0, 2.0, 2.5, 3.0, 9.0])}
    bins = attribute_bins(measures, {"thickness": [2.0, 3.0]})
    assert bins["thickness"] == ["thin", "thin", "medium", "medium", "thick"]
    edges = tertile_edges({"slant": np.arange(9.0)})
    assert edges["slant"] == pytest.approx([8 / 3, 16 / 3])
    # per class: each class's own tertiles (a "thick one" is thick for a one)
    values = {"thickness": np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])}
    names = ["a", "a", "a", "b", "b", "b"]
    per_class = tertile_edges(values, classes=names)
    assert per_class["thickness"]["a"] == pytest.approx([5 / 3, 7 / 3])
    assert attribute_bins(values, per_class, names)["thickness"] == ["thin", "medium", "thick"] * 2
    with pytest.raises(DataError, match="per class"):
        attribute_bins(values, per_class)
    with pytest.raises(DataError, match="no thickness edges for class 'c'"):
        attribute_bins({"thickness": np.array([1.0])}, per_class, ["c"])
