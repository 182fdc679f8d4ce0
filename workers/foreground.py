"""Edge colours without the old background: for semi-transparent pixels, the foreground colour
F in ``I = αF + (1−α)B``.

Without this a cutout keeps a halo of the old background in hair and soft edges. We use
blur-fusion foreground estimation (Germer et al., "Fast Multi-Level Foreground Estimation",
ICPR 2020, and Forte & Pitié, "Approximate Fast Foreground Colour Estimation", ICIP 2021):
two passes of alpha-weighted box blurs give local foreground and background colour means, and
each pixel's colour is corrected toward the compositing equation. It is O(pixels) with box
filters (about 10 ms on an 800-px crop here) where pymatting's multi-level solver took
0.1-0.4 s, and its colours are close to it. Only a crop around the pixels with 0 < α < 1 is
computed; every other pixel keeps its original colour.
"""
from __future__ import annotations

import cv2
import numpy as np

from cutout.jobs.errors import ConfigError

CROP_PADDING = 48  # px of opaque / transparent context the blurs draw colours from
BLUR_RADII = (90, 6)  # coarse pass for far colours, fine pass for local ones (the paper's)


def estimate_foreground(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float32 HxWx3 in 0..1: ``rgb`` / 255, with solved colours where 0 < alpha < 1."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(f"estimate_foreground needs uint8 HxWx3 rgb, got {rgb.dtype} {rgb.shape}")
    if alpha.shape != rgb.shape[:2]:
        raise ConfigError(f"alpha must be {rgb.shape[:2]}, got {alpha.shape}")
    foreground = rgb.astype(np.float32) / 255.0
    soft = (alpha > 0.0) & (alpha < 1.0)
    if not soft.any():
        return foreground
    box = _padded_box(soft, CROP_PADDING)
    solved = blur_fusion(foreground[box], alpha[box].astype(np.float32))
    crop = foreground[box]
    crop[soft[box]] = solved[soft[box]]
    return foreground


def blur_fusion(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Foreground colours for ``image`` (float32 HxWx3, 0..1) given ``alpha``."""
    fg, bg = image, image
    for radius in BLUR_RADII:
        fg, bg = _blur_fusion_pass(image, fg, bg, alpha, radius)
    return fg


def _blur_fusion_pass(image, fg, bg, alpha, radius: int):
    size = (radius, radius)
    a = alpha[..., None]
    blurred_alpha = cv2.blur(alpha, size)[..., None]
    blurred_fg = cv2.blur(fg * a, size) / (blurred_alpha + 1e-5)
    blurred_bg = cv2.blur(bg * (1.0 - a), size) / ((1.0 - blurred_alpha) + 1e-5)
    corrected = blurred_fg + a * (image - a * blurred_fg - (1.0 - a) * blurred_bg)
    return np.clip(corrected, 0.0, 1.0).astype(np.float32), blurred_bg.astype(np.float32)


def _padded_box(region: np.ndarray, padding: int) -> tuple[slice, slice]:
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    height, width = region.shape
    return (
        slice(max(0, rows[0] - padding), min(height, rows[-1] + 1 + padding)),
        slice(max(0, cols[0] - padding), min(width, cols[-1] + 1 + padding)),
    )
