"""Edge colours without the old background: for semi-transparent pixels, the foreground colour
F in ``I = αF + (1−α)B`` (pymatting's multi-level ``estimate_foreground_ml``).

Without this a cutout keeps a halo of the old background in hair and soft edges. Only a crop
around the pixels with 0 < α < 1 is solved; every other pixel keeps its original colour.
"""
from __future__ import annotations

import numpy as np

from jobs.errors import ConfigError

CROP_PADDING = 16  # px of opaque / transparent context the solver draws colours from


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
    from pymatting import estimate_foreground_ml

    solved = estimate_foreground_ml(
        foreground[box].astype(np.float64), alpha[box].astype(np.float64)
    )
    crop = foreground[box]
    crop[soft[box]] = np.clip(solved, 0.0, 1.0)[soft[box]]
    return foreground


def _padded_box(region: np.ndarray, padding: int) -> tuple[slice, slice]:
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    height, width = region.shape
    return (
        slice(max(0, rows[0] - padding), min(height, rows[-1] + 1 + padding)),
        slice(max(0, cols[0] - padding), min(width, cols[-1] + 1 + padding)),
    )
