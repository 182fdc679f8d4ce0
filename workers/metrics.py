"""Matting and segmentation metrics, as defined by alphamatting.com (Rhemann et al. 2009).

All functions take alphas as float arrays in 0..1. ``region`` restricts the sum to a boolean
mask (the trimap's unknown pixels); ``None`` means the whole image.
"""
from __future__ import annotations

import numpy as np


def _region(alpha: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    return np.ones(alpha.shape, bool) if region is None else region


def sad(alpha: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Sum of absolute differences, divided by 1000 (the benchmark's convention)."""
    return float(np.abs(alpha - gt)[_region(alpha, region)].sum() / 1000.0)


def mse(alpha: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean squared error over the region."""
    selected = _region(alpha, region)
    return float(((alpha - gt) ** 2)[selected].mean()) if selected.any() else 0.0


def _gaussian_gradient_magnitude(alpha: np.ndarray, sigma: float = 1.4) -> np.ndarray:
    import cv2

    smoothed = cv2.GaussianBlur(alpha.astype(np.float64), (0, 0), sigma)
    gx = cv2.Sobel(smoothed, cv2.CV_64F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(smoothed, cv2.CV_64F, 0, 1, ksize=3) / 8.0
    return np.sqrt(gx * gx + gy * gy)


def gradient_error(alpha: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Squared difference of Gaussian-derivative gradient magnitudes, / 1000."""
    diff = _gaussian_gradient_magnitude(alpha) - _gaussian_gradient_magnitude(gt)
    return float((diff**2)[_region(alpha, region)].sum() / 1000.0)


def connectivity_error(
    alpha: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None, step: float = 0.1
) -> float:
    """How much each pixel's connection to the source region (the largest component that is
    opaque in both mattes at a rising threshold) differs between prediction and truth, / 1000."""
    import cv2

    thresholds = np.arange(0.0, 1.0 + step, step)
    first_disconnected = np.ones(alpha.shape, np.float64)  # threshold where a pixel drops out
    for threshold in thresholds[1:]:
        both = ((alpha >= threshold) & (gt >= threshold)).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(both, connectivity=4)
        if count <= 1:
            source = np.zeros(alpha.shape, bool)
        else:
            largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            source = labels == largest
        dropped = (~source) & (first_disconnected == 1)
        first_disconnected[dropped] = threshold - step
    first_disconnected[first_disconnected == 1] = 1.0

    def degree(matte: np.ndarray) -> np.ndarray:
        distance = matte - first_disconnected
        return 1.0 - distance * (distance >= 0.15)

    error = np.abs(degree(alpha) - degree(gt))
    return float(error[_region(alpha, region)].sum() / 1000.0)


def iou(mask: np.ndarray, gt_mask: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """Intersection over union of two boolean masks, leaving out ``ignore`` pixels."""
    keep = np.ones(mask.shape, bool) if ignore is None else ~ignore
    inter = np.logical_and(mask, gt_mask)[keep].sum()
    union = np.logical_or(mask, gt_mask)[keep].sum()
    return float(inter / union) if union else 1.0


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the chance that a random positive scores above a random negative (ties count
    half); NaN when either class is empty. Used to judge how well a score finds bad outputs."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
