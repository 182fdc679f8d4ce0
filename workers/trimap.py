"""Soft mask → trimap (0 background / 128 unknown / 255 foreground) for the matting solver.

A segmenter such as IS-Net is confident almost everywhere (p ≈ 0 or 1) and hesitant in hair,
fur and motion blur. The unknown region is therefore: every hesitant pixel
(``bg_threshold < p < fg_threshold``) plus a band of half-width ``band · max(H, W)`` px on both
sides of it and of the hard 0/1 boundary (the confident sets are eroded by the band). The band
scales with the image so that a 4000-px photo gets the same relative margin as an 800-px one.
Fewer unknown pixels means faster matting, so nothing else becomes unknown.
"""
from __future__ import annotations

import cv2
import numpy as np

from cutout.jobs.errors import ConfigError

BACKGROUND, UNKNOWN, FOREGROUND = 0, 128, 255


def band_radius(shape: tuple[int, ...], band: float) -> int:
    """Band half-width in px: at least 1, proportional to the long side."""
    return max(1, int(round(band * max(shape[0], shape[1]))))


def make_trimap(
    mask: np.ndarray,
    *,
    fg_threshold: float = 0.95,
    bg_threshold: float = 0.05,
    band: float = 0.01,
) -> np.ndarray:
    """Definite fg/bg = confident pixels eroded by the band; everything else unknown."""
    if mask.ndim != 2:
        raise ConfigError(f"make_trimap expects an HxW mask, got shape {mask.shape}")
    if not 0.0 <= bg_threshold < fg_threshold <= 1.0:
        raise ConfigError(f"need 0 <= bg_threshold < fg_threshold <= 1, got {bg_threshold}, {fg_threshold}")
    radius = band_radius(mask.shape, band)
    trimap = np.full(mask.shape, UNKNOWN, np.uint8)
    trimap[eroded(mask >= fg_threshold, radius)] = FOREGROUND
    trimap[eroded(mask <= bg_threshold, radius)] = BACKGROUND
    return trimap


def eroded(region: np.ndarray, radius: int) -> np.ndarray:
    """``region`` eroded by a disc of ``radius`` px: the pixels farther than ``radius`` from any
    pixel outside it (the image border does not count as outside).

    An exact Euclidean distance transform costs the same for any radius, where ``cv2.erode``
    with a disc grows with it: 10.5 s against 0.4 s for the two erosions of a 48 MP photo.
    """
    distance = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance > radius


def normalise_trimap(array: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A user trimap (8-bit gray, RGB or 0..1 float) → 0/128/255; ≤32 bg, ≥224 fg, else unknown."""
    values = np.asarray(array)
    if values.ndim == 3:
        values = values[:, :, :3].mean(axis=2)
    if values.ndim != 2:
        raise ConfigError(f"a trimap must be a 2-D gray image, got shape {np.shape(array)}")
    if shape is not None and values.shape != tuple(shape[:2]):
        raise ConfigError(
            f"trimap shape {values.shape[1]}x{values.shape[0]} (WxH) does not match the image "
            f"{shape[1]}x{shape[0]}"
        )
    if values.dtype.kind == "f" and values.size and values.max() <= 1.0:
        values = values * 255.0
    trimap = np.full(values.shape, UNKNOWN, np.uint8)
    trimap[values <= 32] = BACKGROUND
    trimap[values >= 224] = FOREGROUND
    return trimap


def load_trimap(data: bytes, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a trimap image (any format ``decode_image`` reads) and normalise it."""
    from cutout.workers.decode import decode_image

    decoded = decode_image(data, name="trimap")
    return normalise_trimap(decoded.rgb, shape)
