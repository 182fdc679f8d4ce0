"""estimate_alpha on synthetic mattes with known alpha and on real alphamatting.com photos."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.errors import ConfigError, MattingError
from cutout.workers import matte
from cutout.workers.matte import estimate_alpha


def _synthetic(height: int = 60, width: int = 120):
    """Textured foreground over a different textured background; soft ramp over the middle third."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    start, end = width // 3, 2 * width // 3
    alpha = np.clip((x - start) / (end - start), 0.0, 1.0)
    fg = np.dstack([0.8 + 0.1 * np.sin(y / 5), 0.3 + 0.1 * np.cos(x / 7), 0.2 + 0 * x])
    bg = np.dstack([0.1 + 0 * x, 0.3 + 0.1 * np.sin(x / 9), 0.7 + 0.1 * np.cos(y / 6)])
    image = fg * alpha[:, :, None] + bg * (1 - alpha[:, :, None])
    rgb = np.clip(np.rint(image * 255 + rng.normal(0, 0.5, image.shape)), 0, 255).astype(np.uint8)
    trimap = np.full((height, width), 128, np.uint8)
    trimap[:, : start - 4] = 0
    trimap[:, end + 4 :] = 255
    return rgb, trimap, alpha.astype(np.float32)


def test_closed_form_recovers_a_known_soft_alpha():
    rgb, trimap, truth = _synthetic()
    result = estimate_alpha(rgb, trimap)
    unknown = trimap == 128
    error = np.abs(result.alpha - truth)[unknown].mean()
    naive_error = np.abs(0.5 - truth)[unknown].mean()
    assert error < 0.05 and error < naive_error / 4
    assert result.unknown_pixels == unknown.sum() and result.solve_scale == 1.0
    assert result.alpha.dtype == np.float32


def test_known_pixels_keep_their_trimap_value():
    rgb, trimap, _ = _synthetic()
    alpha = estimate_alpha(rgb, trimap).alpha
    assert (alpha[trimap == 0] == 0).all() and (alpha[trimap == 255] == 1).all()
    assert alpha.min() >= 0 and alpha.max() <= 1


def test_long_unknown_box_is_solved_downscaled_and_upsampled():
    rgb, trimap, truth = _synthetic(120, 240)  # unknown: columns 76..163
    result = estimate_alpha(rgb, trimap, max_side=80)
    assert result.solve_scale == pytest.approx(80 / 120)  # box: 120 rows x 96 cols
    assert result.alpha.shape == (120, 240)
    assert np.abs(result.alpha - truth)[trimap == 128].mean() < 0.08
    assert (result.alpha[trimap == 0] == 0).all() and (result.alpha[trimap == 255] == 1).all()


def test_no_unknown_pixels_returns_the_trimap_without_solving(monkeypatch):
    def must_not_solve(*args, **kwargs):
        raise AssertionError("solver called")

    monkeypatch.setattr(matte, "_solve", must_not_solve)
    trimap = np.zeros((20, 30), np.uint8)
    trimap[:, 15:] = 255
    result = estimate_alpha(np.zeros((20, 30, 3), np.uint8), trimap)
    np.testing.assert_array_equal(result.alpha, trimap / 255.0)
    assert result.unknown_pixels == 0


def test_method_none_uses_the_mask_in_the_unknown_band():
    rgb, trimap, truth = _synthetic()
    mask = np.full(trimap.shape, 0.3, np.float32)
    result = estimate_alpha(rgb, trimap, method="none", mask=mask)
    np.testing.assert_allclose(result.alpha[trimap == 128], 0.3)
    assert (result.alpha[trimap == 255] == 1).all() and result.method == "none"


def test_knn_also_beats_the_naive_alpha():
    rgb, trimap, truth = _synthetic()
    alpha = estimate_alpha(rgb, trimap, method="knn").alpha
    unknown = trimap == 128
    assert np.abs(alpha - truth)[unknown].mean() < np.abs(0.5 - truth)[unknown].mean() / 2


def test_solver_failure_raises_matting_error(monkeypatch):
    monkeypatch.setattr(matte, "CF_MAXITER", 1)
    monkeypatch.setattr(matte, "CF_RTOL", 1e-14)
    rgb, trimap, _ = _synthetic()
    with pytest.raises(MattingError, match="closed-form matting failed") as caught:
        estimate_alpha(rgb, trimap)
    assert caught.value.stage == "matte"


def test_shape_mismatch_is_a_config_error():
    with pytest.raises(ConfigError):
        estimate_alpha(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11), np.uint8))


def _alphamatting(name: str):
    root = Path(os.environ.get("CUTOUT_EVAL_DATA", "../shared/testdata")) / "alphamatting_lowres"
    if not root.is_dir():
        pytest.fail(f"evaluation data missing at {root} (set CUTOUT_EVAL_DATA)")
    rgb = np.asarray(Image.open(root / "image" / f"{name}.png").convert("RGB"))
    trimap = np.asarray(Image.open(root / "trimap1" / f"{name}.png").convert("L"))
    truth = np.asarray(Image.open(root / "alpha" / f"{name}.png").convert("L")) / 255.0
    return rgb, trimap, truth


@pytest.mark.parametrize("name", ["GT01", "GT02"])
def test_closed_form_beats_naive_alpha_on_real_photos(name):
    from cutout.workers.trimap import normalise_trimap

    rgb, raw_trimap, truth = _alphamatting(name)
    trimap = normalise_trimap(raw_trimap, shape=rgb.shape[:2])
    unknown = trimap == 128
    result = estimate_alpha(rgb, trimap, max_side=640)
    sad = np.abs(result.alpha - truth)[unknown].sum() / 1000
    naive_sad = np.abs(0.5 - truth)[unknown].sum() / 1000
    assert sad < naive_sad / 4, (sad, naive_sad)
