"""make_trimap / normalise_trimap / load_trimap."""
from __future__ import annotations

import numpy as np
import pytest

from cutout.jobs.errors import ConfigError
from tests import images
from cutout.workers.trimap import band_radius, load_trimap, make_trimap, normalise_trimap


def _disc_mask(size: int = 200, radius: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return ((x - size / 2) ** 2 + (y - size / 2) ** 2 <= radius**2).astype(np.float32)


def test_hard_mask_gets_a_band_of_the_scaled_width_around_its_edge():
    mask = np.zeros((100, 200), np.float32)
    mask[:, 120:] = 1.0  # straight vertical edge between columns 119 and 120
    trimap = make_trimap(mask, band=0.02)  # radius 4 px at a 200-px long side
    assert set(np.unique(trimap)) == {0, 128, 255}
    unknown_cols = np.flatnonzero((trimap == 128).all(axis=0))
    np.testing.assert_array_equal(unknown_cols, np.arange(116, 124))  # 4 px each side
    assert (trimap[:, :116] == 0).all() and (trimap[:, 124:] == 255).all()


def test_band_scales_with_image_size():
    assert band_radius((200, 100), 0.01) == 2
    assert band_radius((2000, 1000), 0.01) == 20
    assert band_radius((50, 50), 0.0) == 1
    small = (make_trimap(_disc_mask(200, 60), band=0.02) == 128).sum()
    large = (make_trimap(_disc_mask(400, 120), band=0.02) == 128).sum()
    assert 3.5 < large / small < 4.5  # twice the size → twice the perimeter × twice the band


def test_uncertain_pixels_are_unknown_even_far_from_the_boundary():
    mask = np.zeros((100, 100), np.float32)
    mask[40:60, 40:60] = 0.5  # a hesitant patch (hair)
    mask[:, 80:] = 1.0
    trimap = make_trimap(mask, band=0.01)
    assert (trimap[40:60, 40:60] == 128).all()
    assert trimap[10, 10] == 0 and trimap[50, 95] == 255


def test_edge_of_image_is_not_eroded():
    trimap = make_trimap(np.ones((50, 50), np.float32))
    assert (trimap == 255).all()


def test_normalise_trimap_thresholds_and_shape_check():
    values = np.array([[0, 32, 33, 128], [200, 223, 224, 255]], np.uint8)
    np.testing.assert_array_equal(
        normalise_trimap(values), [[0, 0, 128, 128], [128, 128, 255, 255]]
    )
    with pytest.raises(ConfigError, match="does not match"):
        normalise_trimap(values, shape=(3, 4))


def test_load_trimap_from_png_bytes():
    values = np.zeros((10, 12), np.uint8)
    values[:, 4:8] = 128
    values[:, 8:] = 255
    trimap = load_trimap(images.encode(values, "PNG"), shape=(10, 12))
    np.testing.assert_array_equal(trimap, values)
