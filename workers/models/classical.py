"""Classical segmenters, no weights: ``threshold`` for plain/studio backgrounds, ``grabcut``.

``threshold``: the background colour is the median of a border strip; each pixel's distance
to it (CIELAB) becomes foreground probability through a linear ramp whose start sits above
the border's own noise; then specks are removed (opening + components smaller than a
fraction of the largest) and small holes filled.

``grabcut``: OpenCV's GrabCut, initialised with the image minus a margin as "probably
foreground", run on a copy whose long side is ``seg_size`` (default 512), then feathered and
resized back. Both assume the subject is roughly centred and does not fill the border.
"""
from __future__ import annotations

import numpy as np

from cutout.jobs.errors import ConfigError
from cutout.workers.models.base import check_images
from cutout.workers.models.registry import ModelSpec, register_model

BORDER_FRACTION = 0.02  # border strip width, fraction of the short side
MIN_COMPONENT_FRACTION = 0.05  # components smaller than this × the largest are specks
MAX_HOLE_FRACTION = 0.002  # enclosed background smaller than this × image area is filled
GRABCUT_MARGIN = 0.05  # rectangle margin, fraction of each side
GRABCUT_ITERATIONS = 5


@register_model("threshold")
def _threshold() -> ModelSpec:
    return ModelSpec(
        name="threshold",
        family="classical",
        description="Colour distance from the border's background colour: plain/studio backdrops.",
        builder=lambda spec, options, device: _classical(spec, options, ThresholdSegmenter()),
    )


@register_model("grabcut")
def _grabcut() -> ModelSpec:
    return ModelSpec(
        name="grabcut",
        family="classical",
        description="OpenCV GrabCut from a centred rectangle; slow-ish, no weights.",
        builder=lambda spec, options, device: _classical(spec, options, GrabCutSegmenter(options.seg_size or 512)),
        input_size=512,
    )


def _classical(spec: ModelSpec, options, segmenter):
    if options.weights:
        raise ConfigError(f"model {spec.name!r} takes no weights (got {options.weights!r})")
    return segmenter


class ThresholdSegmenter:
    name = "threshold"
    device = "cpu"

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        check_images(images)
        return [threshold_mask(image) for image in images]


class GrabCutSegmenter:
    name = "grabcut"
    device = "cpu"

    def __init__(self, work_size: int = 512):
        self.input_size = work_size

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        check_images(images)
        return [grabcut_mask(image, self.input_size) for image in images]


# --- threshold --------------------------------------------------------------------------------
def border_pixels(image: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a ``width``-wide frame around the image, as an N×C array."""
    top, bottom = image[:width], image[-width:]
    left, right = image[width:-width, :width], image[width:-width, -width:]
    return np.concatenate([part.reshape(-1, image.shape[2]) for part in (top, bottom, left, right)])


def threshold_mask(image: np.ndarray) -> np.ndarray:
    import cv2

    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    width = max(2, round(min(image.shape[:2]) * BORDER_FRACTION))
    border = border_pixels(lab, width)
    background = np.median(border, axis=0)
    border_distance = np.linalg.norm(border - background, axis=1)
    noise = float(np.percentile(border_distance, 95))  # how far the backdrop itself wanders
    start = max(noise * 1.5, 6.0)
    ramp = max(noise, 12.0)
    distance = np.linalg.norm(lab - background, axis=2)
    soft = np.clip((distance - start) / ramp, 0.0, 1.0)
    support, holes = _clean_support(soft > 0.5)
    return np.maximum(soft * support, holes).astype(np.float32)


def _clean_support(hard: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where foreground may be (big components after an opening, grown by a few pixels so the
    soft ramp at edges survives) and the small enclosed holes to fill: two float32 maps."""
    import cv2

    size = max(3, round(min(hard.shape) * 0.005) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    opened = cv2.morphologyEx(hard.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    keep = _large_components(opened)
    filled = _fill_small_holes(keep, MAX_HOLE_FRACTION * hard.size)
    support = cv2.dilate(keep.astype(np.uint8), kernel).astype(np.float32)
    return support, (filled & ~keep).astype(np.float32)


def _large_components(binary: np.ndarray) -> np.ndarray:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(binary.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    big = 1 + np.flatnonzero(areas >= MIN_COMPONENT_FRACTION * areas.max())
    return np.isin(labels, big)


def _fill_small_holes(foreground: np.ndarray, max_area: float) -> np.ndarray:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats((~foreground).astype(np.uint8), connectivity=4)
    filled = foreground.copy()
    height, width = foreground.shape
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        touches_border = x == 0 or y == 0 or x + w == width or y + h == height
        if not touches_border and area <= max_area:
            filled[labels == label] = True
    return filled


# --- grabcut ----------------------------------------------------------------------------------
def _start_rect(rect: tuple[int, int, int, int], scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A user's box (x0, y0, x1, y1) as GrabCut's start (x, y, w, h) at the working scale,
    kept one pixel inside the frame: GrabCut learns the background from outside the box, so a
    box that fills the whole photo (common: "the object is the photo") would leave it none."""
    x0 = min(max(1, int(rect[0] * scale)), width - 2)
    y0 = min(max(1, int(rect[1] * scale)), height - 2)
    x1 = max(x0 + 1, min(width - 1, round(rect[2] * scale)))
    y1 = max(y0 + 1, min(height - 1, round(rect[3] * scale)))
    return x0, y0, x1 - x0, y1 - y0


def grabcut_mask(image: np.ndarray, work_size: int = 512,
                 rect: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """GrabCut started from ``rect`` (x0, y0, x1, y1 in image pixels: a user's box), else from
    the image minus a margin of ``GRABCUT_MARGIN``."""
    import cv2

    from cutout.workers.refine import seeded_grabcut

    height, width = image.shape[:2]
    scale = min(1.0, work_size / max(height, width))
    small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    h, w = small.shape[:2]
    if rect is None:
        mx, my = max(1, round(w * GRABCUT_MARGIN)), max(1, round(h * GRABCUT_MARGIN))
        start = (mx, my, w - 2 * mx, h - 2 * my)
    else:
        start = _start_rect(rect, scale, w, h)
    labels = np.zeros((h, w), dtype=np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
    seeded_grabcut(bgr, labels, start, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_RECT)
    hard = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
    soft = cv2.GaussianBlur(hard, (0, 0), sigmaX=max(0.8, 0.003 * max(h, w)))
    return np.clip(cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0).astype(np.float32)
