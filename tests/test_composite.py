"""composite() for every background kind, and estimate_foreground()."""
from __future__ import annotations

import numpy as np
import pytest

from cutout.jobs.errors import ConfigError
from cutout.jobs.spec import Background
from tests import images
from cutout.workers.composite import composite, cover_fit
from cutout.workers.foreground import estimate_foreground

RED, BLUE = (220, 30, 30), (20, 40, 200)


def _scene(height: int = 80, width: int = 120):
    """Red subject (columns ≥ 60) on blue, one soft column (alpha 0.5) at column 59."""
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:, :60] = BLUE
    rgb[:, 60:] = RED
    alpha = np.zeros((height, width), np.float32)
    alpha[:, 60:] = 1.0
    alpha[:, 59] = 0.5
    rgb[:, 59] = np.rint((np.array(RED) + np.array(BLUE)) / 2).astype(np.uint8)
    return rgb, alpha


def test_transparent_is_straight_rgba():
    rgb, alpha = _scene()
    out = composite(rgb, alpha, Background.parse("transparent"))
    assert out.shape == (80, 120, 4) and out.dtype == np.uint8
    assert (out[:, :59, 3] == 0).all() and (out[:, :59, :3] == 0).all()
    assert (out[:, 60:, 3] == 255).all() and (out[:, 60:, :3] == RED).all()
    assert (out[:, 59, 3] == 128).all()  # 0.5 * 255 = 127.5 rounds to 128, not truncates


def test_transparent_uses_the_estimated_foreground_for_soft_pixels():
    rgb, alpha = _scene()
    foreground = estimate_foreground(rgb, alpha)
    out = composite(rgb, alpha, Background.parse("transparent"), foreground=foreground)
    edge = out[:, 59, :3].astype(int)
    assert np.abs(edge - RED).max() < 25  # the blue of the old background is removed
    assert np.abs(rgb[:, 59].astype(int) - RED).max() > 80  # ... which the raw pixel still had


def test_estimate_foreground_leaves_hard_pixels_alone():
    rgb, alpha = _scene()
    foreground = estimate_foreground(rgb, alpha)
    assert foreground.dtype == np.float32 and foreground.shape == (80, 120, 3)
    hard = (alpha == 0) | (alpha == 1)
    np.testing.assert_array_equal(foreground[hard], rgb[hard] / np.float32(255))
    no_soft = estimate_foreground(rgb, (alpha > 0.5).astype(np.float32))
    np.testing.assert_array_equal(no_soft, rgb / np.float32(255))


def test_mask_is_the_rounded_alpha():
    rgb, alpha = _scene()
    out = composite(rgb, alpha, Background.parse("mask"))
    assert out.shape == (80, 120) and out[0, 59] == 128 and out[0, 0] == 0 and out[0, 70] == 255


def test_color_background_blends_correctly():
    rgb, alpha = _scene()
    out = composite(rgb, alpha, Background.parse("color:#00ff00"))
    assert out.shape == (80, 120, 3)
    assert (out[:, :59] == [0, 255, 0]).all() and (out[:, 60:] == RED).all()
    expected = np.rint(rgb[0, 59] / 255 * 0.5 * 255 + np.array([0, 255, 0]) * 0.5)
    np.testing.assert_array_equal(out[0, 59], expected)


def test_blur_does_not_bleed_the_subject_into_the_background():
    rgb, alpha = _scene()
    rng = np.random.default_rng(0)
    noise = rng.integers(-20, 21, rgb.shape)
    rgb = np.clip(rgb.astype(int) + noise * (alpha[:, :, None] == 0), 0, 255).astype(np.uint8)
    out = composite(rgb, alpha, Background.parse("blur:200"))  # sigma 12 px here
    assert out.shape == (80, 120, 3)
    near_edge = out[:, 50:59].astype(float)  # background within 10 px of the subject
    red_excess = near_edge[:, :, 0].mean() - BLUE[0]
    assert red_excess < 3.0, red_excess  # a naive blur of the whole image gives ~50
    assert near_edge.std(axis=(0, 1)).max() < rgb[:, :50].std(axis=(0, 1)).max()  # blurred
    assert (out[:, 60:] == RED).all()  # the subject itself stays sharp


def test_naive_blur_would_bleed():
    """The measurement above can fail: blurring the whole image puts red next to the subject."""
    import cv2

    from cutout.workers.composite import blur_sigma

    rgb, alpha = _scene()
    sigma = blur_sigma(rgb.shape[:2], 200)
    naive = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), sigma)
    assert naive[:, 50:59, 0].mean() - BLUE[0] > 30


def test_image_background_is_cover_fitted():
    rgb, alpha = _scene()
    backdrop = np.zeros((40, 200, 3), np.uint8)  # wide: scale 2 → 400 wide, crop centre 120
    backdrop[:, :, 1] = np.arange(200, dtype=np.uint8)[None, :]
    out = composite(rgb, alpha, Background.parse("image:x.png"), background_image=backdrop)
    assert out.shape == (80, 120, 3)
    assert (out[:, 60:] == RED).all()
    fitted = cover_fit(backdrop, (80, 120))
    assert fitted.shape == (80, 120, 3)
    assert abs(int(fitted[40, 0, 1]) - 70) <= 1 and abs(int(fitted[40, 119, 1]) - 129) <= 1
    np.testing.assert_array_equal(out[:, :59], fitted[:, :59])


def test_image_background_without_array_is_a_config_error():
    rgb, alpha = _scene()
    with pytest.raises(ConfigError):
        composite(rgb, alpha, Background.parse("image:x.png"))


def test_cover_fit_upscales_small_images():
    fitted = cover_fit(images.gradient_rgb(10, 10), (50, 80))
    assert fitted.shape == (50, 80, 3)
