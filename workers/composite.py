"""Alpha + colours → the output pixels for each background kind.

All blending is straight (un-premultiplied) alpha in float32, ``out = F·α + B·(1−α)``, rounded
(not truncated) to uint8. ``F`` is the estimated foreground (edge colours without the old
background) when given, else the input colour.

- transparent: RGBA; fully transparent pixels get colour 0 (clean, compresses well)
- mask: the alpha as an 8-bit gray image
- color: a flat colour behind the subject
- blur: "portrait mode": the background is blurred from BACKGROUND PIXELS ONLY, by normalised
  convolution ``blur(I·(1−α)) / blur(1−α)``, so the subject's colours do not bleed into it.
  ``blur_radius`` is in px for a 1000-px long side and scales with the image.
- image: a background photo, scaled to cover and centre-cropped.
"""
from __future__ import annotations

import cv2
import numpy as np

from cutout.jobs.errors import ConfigError
from cutout.jobs.spec import Background

BLUR_REFERENCE_SIDE = 1000  # blur_radius is defined for an image of this long side
_MAX_DIRECT_SIGMA = 6.0  # above this, blur a shrunk copy (same look, a fraction of the cost)
_MIN_WEIGHT = 1e-3  # normalised-convolution weight below which no background is nearby


def composite(
    rgb: np.ndarray,
    alpha: np.ndarray,
    background: Background,
    *,
    foreground: np.ndarray | None = None,
    background_image: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 HxWx4 (transparent), HxW (mask) or HxWx3 (color / blur / image)."""
    if alpha.shape != rgb.shape[:2]:
        raise ConfigError(f"alpha {alpha.shape} does not match image {rgb.shape[:2]}")
    a = np.clip(alpha.astype(np.float32), 0.0, 1.0)
    if background.kind == "mask":
        return _to_uint8(a * 255.0)
    if background.kind == "transparent":
        visible = a > 0.0
        rgba = np.empty(a.shape + (4,), np.uint8)
        for channel in range(3):
            rgba[:, :, channel] = np.where(visible, _to_uint8(_colour(rgb, foreground, channel) * 255.0), 0)
        rgba[:, :, 3] = _to_uint8(a * 255.0)
        return rgba
    if background.kind == "color":
        behind = np.array(background.color or (255, 255, 255), np.float32) / 255.0
    elif background.kind == "blur":
        behind = blurred_background(rgb, a, background.blur_radius or 25)
    elif background.kind == "image":
        if background_image is None:
            raise ConfigError("background kind 'image' needs background_image")
        behind = cover_fit(background_image, rgb.shape[:2]).astype(np.float32) / 255.0
    else:
        raise ConfigError(f"unknown background kind {background.kind!r}")
    out = np.empty(rgb.shape, np.uint8)
    for channel in range(3):
        below = behind[..., channel]
        out[:, :, channel] = _to_uint8((_colour(rgb, foreground, channel) * a + below * (1.0 - a)) * 255.0)
    return out


def _colour(rgb: np.ndarray, foreground: np.ndarray | None, channel: int) -> np.ndarray:
    """One channel of F in 0..1. Channel by channel keeps a 48 MP image's float temporaries
    to a few hundred MB instead of several GB."""
    if foreground is None:
        return rgb[:, :, channel].astype(np.float32) / 255.0
    return foreground[:, :, channel].astype(np.float32, copy=False)


def blurred_background(rgb: np.ndarray, alpha: np.ndarray, radius: int) -> np.ndarray:
    """float32 HxWx3 0..1: a blur of the background pixels only (normalised convolution)."""
    sigma = blur_sigma(rgb.shape[:2], radius)
    weight = 1.0 - alpha
    image = rgb.astype(np.float32) / 255.0
    numerator = _gaussian(image * weight[:, :, None], sigma)
    denominator = _gaussian(weight, sigma)
    plain = _gaussian(image, sigma)  # only used where no background pixel is within reach
    has_background = denominator > _MIN_WEIGHT
    safe = np.where(has_background, denominator, 1.0)[:, :, None]
    return np.where(has_background[:, :, None], numerator / safe, plain)


def blur_sigma(shape: tuple[int, int], radius: int) -> float:
    """Gaussian sigma for ``radius`` (px at a 1000-px long side), scaled to this image."""
    return max(0.5, radius * max(shape) / BLUR_REFERENCE_SIDE / 2.0)


def _gaussian(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; large sigmas run on a shrunk copy and are scaled back up."""
    height, width = values.shape[:2]
    shrink = max(1.0, sigma / _MAX_DIRECT_SIGMA)
    if shrink <= 1.0:
        return cv2.GaussianBlur(values, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    size = (max(1, round(width / shrink)), max(1, round(height / shrink)))
    small = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / shrink, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR).reshape(values.shape)


def cover_fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Scale ``image`` so it covers ``shape`` (H, W), then centre-crop to exactly that size."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]
    height, width = shape
    scale = max(height / image.shape[0], width / image.shape[1])
    new_w = max(width, round(image.shape[1] * scale))
    new_h = max(height, round(image.shape[0] * scale))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width]


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
