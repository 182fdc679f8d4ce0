"""Class selection: a class model's mask picks which of the salient network's objects to keep.

A salient network draws sharp edges around "what stands out", which may be the wrong object
(the cup beside the spoon); a semantic or instance model (DeepLabV3, LR-ASPP, Mask R-CNN) knows
which pixels are a ``person`` or a ``cup`` but draws coarse edges. With ``select_by`` both run:
the salient mask's connected components (alpha >= 0.5, 8-connected, found on a copy with a long
side of ``WORK_SIDE``) are kept when at least ``MIN_SHARE`` of their area lies in the class
mask (class probability >= 0.5), with their soft values; the others are zeroed. The soft
pixels below 0.5 go with their nearest component, so a kept object keeps its whole soft edge
and a dropped one takes its own along. The rule a box
uses (``cutout.workers.boxes.keep_box_components``) with the class mask in place of the box.

When no component passes ``MIN_SHARE`` but some touch the class mask, the one with the most
pixels in it is kept (the class model's coarse mask often covers only part of the object) and
a note says so. When none touches it, the image has none of the classes as far as the class
model can tell: the mask is emptied (the output is flagged ``empty_alpha``) rather than
keeping an object of another class; the note says so.
"""
from __future__ import annotations

import numpy as np

MIN_SHARE = 0.5  # a component is kept when at least this share of its area is class pixels
CLASS_THRESHOLD = 0.5  # class probability from which a pixel counts as the classes'
WORK_SIDE = 512  # components are found on a copy with this long side (cheap at any input size)


def select_by_class(mask: np.ndarray, class_mask: np.ndarray, *,
                    min_share: float = MIN_SHARE) -> tuple[np.ndarray, str]:
    """``mask`` (soft, HxW) with only the components the class mask (HxW probabilities, any
    size) claims; and a note saying what was kept."""
    import cv2

    small, scale = _small(mask, WORK_SIDE)
    small_class = cv2.resize(class_mask.astype(np.float32), (small.shape[1], small.shape[0]),
                             interpolation=cv2.INTER_AREA) >= CLASS_THRESHOLD
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (small >= 0.5).astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask, "no object in the salient mask to select from"
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    inside = np.bincount(labels[small_class].ravel(), minlength=count).astype(np.float64)
    kept = np.zeros(count, bool)
    kept[1:] = inside[1:] >= min_share * areas[1:]
    objects = count - 1
    if kept.any():
        note = f"kept {int(kept.sum())} of {objects} object(s)"
    elif inside[1:].max() > 0:
        best = 1 + int(np.argmax(inside[1:]))
        kept[best] = True
        note = (f"kept 1 of {objects} object(s): none lies {min_share:.0%} in the class mask, "
                f"kept the one with the most ({inside[best] / areas[best]:.0%})")
    else:
        return np.zeros_like(mask), f"kept 0 of {objects} object(s): none touches the class mask"
    return mask * _keep_region(labels, kept, mask.shape, scale), note


def _small(mask: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """A copy with a long side of at most ``side`` (area-averaged), and the factor used."""
    import cv2

    height, width = mask.shape
    scale = min(1.0, side / max(height, width))
    if scale == 1.0:
        return mask.astype(np.float32), 1.0
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA), scale


def _keep_region(labels: np.ndarray, kept: np.ndarray, shape: tuple[int, int],
                 scale: float) -> np.ndarray:
    """Every pixel belongs to its nearest component (on the small copy), so a kept object
    keeps its whole soft edge and a dropped one takes its own along; at the mask's size, 0/1."""
    import cv2

    _, nearest = cv2.distanceTransformWithLabels(
        (labels == 0).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
    owner = np.zeros(int(nearest.max()) + 1, np.int64)  # the distance transform's own labels
    core = labels > 0
    owner[nearest[core]] = labels[core]  # ... mapped to the 8-connected components
    region = kept[owner[nearest]].astype(np.uint8)
    if scale != 1.0:
        region = cv2.resize(region, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return region.astype(np.float32)
