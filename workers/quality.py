"""Quality signals of one output: a few numbers measured from the arrays the pipeline already
holds, a score (the estimated chance that the cutout is right) and flags
(``cutout.jobs.records.QUALITY_FLAGS``) when they look wrong, so that among a million outputs the
doubtful ones can be counted, shown and rerun without looking at each.

Measurements (all 0..1), computed on a copy at most ``SIGNAL_SIDE`` px long so they stay cheap
(about 10-20 ms per photo) next to the model:
    ``alpha_coverage``  share of the frame the cutout keeps (alpha ≥ 0.5).
    ``unknown_share``   share of the frame the trimap left to matting (when no trimap was built:
                        the share the mask leaves between the trimap thresholds).
    ``confidence``      mean of |2·mask − 1| over the frame: 1 when the model was sure of every
                        pixel, 0 when it said 0.5 everywhere.
    ``second_object``   area of the second-largest separate kept part over the largest's: near 1
                        when the cutout holds two objects of similar size (a cup and a spoon).
    ``joined_object``   the same after cutting strips narrower than ``NECK``: two objects that
                        touch (people side by side) count as two.
    ``border_contact``  share of the frame's edge the cutout touches (a subject cut by the frame,
                        or background kept).
    ``refine_change``   1 − IoU of the mask before and after refinement: how much GrabCut moved it.
    ``ramp_gain``       share of the kept area that the calibration ramp added (pixels the raw
                        model put below 0.5).
    ``grey_share``      share of the cutout's pixels (alpha > 0.05) left between 0.05 and 0.95.
    ``edge_alignment``  share of the cutout's outline lying on a strong image edge (top quarter
                        of the photo's gradient): low when the outline crosses flat regions.
    ``border_kinship``  share of the frame's edge that the cutout keeps where the kept colour
                        matches (within ``COLOUR_MATCH_DE`` in Lab) some edge pixel it leaves out:
                        background kept along the frame (a desk, a wall) is coloured like the
                        background it dropped, while a subject cut by the frame is not. 0 when
                        the cutout does not touch the frame's edge or keeps all of it.
    ``score``           the chance that the cutout is right (IoU ≥ 0.9 against a person's mask),
                        from a logistic regression on the measurements above (``SCORE_MODEL``).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# Thresholds, checked on the 27 alphamatting.com + 50 GrabCut photos with IS-Net
# (benchmarks/bench_quality_flags.py): coverage there 0.05..0.71, unknown share 0.04..0.22,
# confidence 0.984..0.998; 2 of 77 flagged, both bad cutouts (alphamatting SAD 73 and 226).
EMPTY_ALPHA_MAX = 0.005  # under 0.5 % of the frame kept: the subject was missed, not just small
FULL_FRAME_MIN = 0.97  # over 97 % kept: the background is still there (real subjects leave a margin)
WIDE_UNKNOWN_MIN = 0.2  # a fifth of the frame uncertain: the model hesitated far beyond the edges
LOW_CONFIDENCE_MAX = 0.98  # the calibrated mask is near 0 or 1 almost everywhere (≥ 0.984 on all 77)
KEPT_ALPHA = 0.5  # a pixel counts as kept from this alpha up
SIGNAL_SIDE = 512  # px: the measurements run on a copy this long at most
NECK = 0.03  # parts joined by a strip narrower than 2 × 3 % of the long side count as separate
STRONG_EDGE_QUANTILE = 0.75  # an outline pixel is "on an edge" above this quantile of the gradient
COLOUR_MATCH_DE = 10.0  # Lab ΔE76: two colours closer than this look alike (about 4 just-noticeable steps)
KINSHIP_SAMPLE = 400  # at most this many kept and unkept edge pixels are compared (evenly spaced)

# The score: P(right) = sigmoid(intercept + sum(weight * (value - mean) / scale)), a logistic
# regression (L2 penalty 3 on the standardised weights) fitted on the outputs of the fast,
# balanced and best presets for all 77 visible photos (27 alphamatting.com, 50 GrabCut;
# "right" = IoU of alpha >= 0.5 against the truth >= 0.9), printed by
#   .venv/bin/python benchmarks/quality_cv.py --cache /work/main/.cache/masks
# which also reports it cross-validated (fitted on one half, judged on the other; both folds in
# docs/results.md). Version: cutout.jobs.records.QUALITY_MODEL, part of every config hash.
SCORE_MODEL = {
    "intercept": 1.2883,
    "features": {  # name: (mean, scale, weight)
        "multiple_objects": (0.0173, 0.1304, -0.4112),
        "sqrt_joined_object": (0.0279, 0.0902, 0.1626),
        "sqrt_second_object": (0.0162, 0.0715, -0.8285),
        "border_contact": (0.0947, 0.12, -0.0147),
        "sqrt_refine_change": (0.1217, 0.1217, -0.2009),
        "ramp_gain": (0.0613, 0.0938, -0.3805),
        "grey_share": (0.1498, 0.1237, -0.3275),
        "edge_alignment": (0.928, 0.0745, 0.6099),
        "unknown_share": (0.0803, 0.0761, 0.0338),
        "confidence": (0.9904, 0.0187, 0.0566),
        "alpha_coverage": (0.3055, 0.186, 0.6821),
        "border_kinship": (0.0348, 0.0529, -0.7213),
    },
}
# likely_wrong below this score: the score under which 17 % of the default preset's outputs fall
# when each photo is scored by a model fitted on the other half of the photos (as an unseen
# photo is scored; in-sample scores put the threshold too low). Printed by the same command.
LIKELY_WRONG_BELOW = 0.639
# Two parts of similar size (after cutting narrow necks): on the 77 visible photos, 7 outputs
# reach 0.25 or more and all 7 are bad; the largest value of a good output is 0.12. With
# --objects main (the default) those at MAIN_OBJECT_MIN (0.4) or more are first cut down to the
# main object (cutout.workers.objects), so the flag marks the closer calls left as they are.
MULTIPLE_OBJECTS_MIN = 0.2

_NOTE_FLAGS = (("matting-skipped", "matting_skipped"), ("matting-fallback", "matting_degraded"))


def measure(
    alpha: np.ndarray, mask: np.ndarray, trimap: np.ndarray | None, notes: list[str],
    *, fg_threshold: float = 0.95, bg_threshold: float = 0.05, rgb: np.ndarray | None = None,
    unrefined: np.ndarray | None = None, ramp: tuple[float, float] = (0.0, 1.0),
) -> tuple[dict[str, float], list[str]]:
    """(measurements, flags) for one output; see the module docstring. ``mask`` is the mask
    matting started from, ``unrefined`` the calibrated mask before refinement (None: not
    refined) and ``ramp`` the calibration that made it from the model's raw output."""
    if trimap is not None:
        unknown = float(np.count_nonzero(trimap == 128)) / trimap.size
    else:
        unknown = float(np.count_nonzero((mask > bg_threshold) & (mask < fg_threshold))) / mask.size
    quality = {
        "alpha_coverage": float(np.count_nonzero(alpha >= KEPT_ALPHA)) / alpha.size,
        "unknown_share": unknown,
        "confidence": float(np.abs(2.0 * mask.astype(np.float32) - 1.0).mean()),
    }
    quality.update(shape_signals(alpha, mask, unrefined if unrefined is not None else mask, rgb, ramp))
    quality["score"] = score(quality)
    return {k: round(float(v), 4) for k, v in quality.items()}, flags_for(quality, notes)


def shape_signals(alpha: np.ndarray, mask: np.ndarray, unrefined: np.ndarray,
                  rgb: np.ndarray | None, ramp: tuple[float, float]) -> dict[str, float]:
    """The measurements beyond coverage, unknown band and confidence, on a small copy."""
    alpha, mask, unrefined = (small_copy(a.astype(np.float32, copy=False)) for a in (alpha, mask, unrefined))
    kept = alpha >= KEPT_ALPHA
    low, high = ramp
    raw_half = min(1.0, max(0.0, (0.5 - low) / (high - low)))  # raw 0.5 in calibrated units
    before = unrefined >= KEPT_ALPHA
    visible = alpha > 0.05
    small_rgb = small_copy(rgb) if rgb is not None else None
    return {
        "second_object": second_object(kept),
        "joined_object": second_object(kept, NECK),
        "border_contact": float(np.concatenate([kept[0], kept[-1], kept[:, 0], kept[:, -1]]).mean()),
        "refine_change": 1.0 - _iou(before, mask >= KEPT_ALPHA),
        "ramp_gain": float(np.count_nonzero(before & (unrefined < raw_half))) / max(1, np.count_nonzero(before)),
        "grey_share": float(np.count_nonzero(visible & (alpha < 0.95))) / max(1, np.count_nonzero(visible)),
        "edge_alignment": edge_alignment(kept, small_rgb) if rgb is not None else 0.5,
        "border_kinship": border_kinship(kept, small_rgb) if rgb is not None else 0.0,
    }


def second_object(kept: np.ndarray, neck: float = 0.0) -> float:
    """Area of the second-largest 8-connected kept part over the largest's (0: one part). With
    ``neck`` (a fraction of the long side), parts joined by a strip narrower than that count as
    separate (two people standing shoulder to shoulder)."""
    labels, count = kept_parts(kept, neck)
    areas = np.sort(np.bincount(labels.ravel(), minlength=count + 1)[1:])[::-1]
    return float(areas[1] / areas[0]) if len(areas) > 1 else 0.0


def kept_parts(kept: np.ndarray, neck: float = 0.0) -> tuple[np.ndarray, int]:
    """Labels (1..count) of the kept area's 8-connected parts, and their count; with ``neck``
    (a fraction of the long side), strips narrower than twice that are cut first (an erosion)."""
    binary = kept.astype(np.uint8)
    radius = round(neck * max(kept.shape))
    if radius:
        binary = cv2.erode(binary, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2))
    count, labels = cv2.connectedComponents(binary, connectivity=8)
    return labels, count - 1


def edge_alignment(kept: np.ndarray, rgb: np.ndarray, blur: float = 0.0) -> float:
    """Share of the outline of ``kept`` within a pixel of a strong image edge. ``blur`` (px,
    Gaussian sigma) smooths the photo first, so fine texture (fur, grass) does not set the bar
    for what counts as strong."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if blur:
        gray = cv2.GaussianBlur(gray, (0, 0), blur)
    gradient = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    near = cv2.dilate(gradient, np.ones((3, 3), np.uint8))
    binary = kept.astype(np.uint8)
    outline = (binary - cv2.erode(binary, np.ones((3, 3), np.uint8))).astype(bool)
    if not outline.any():
        return 0.5
    strong = float(np.quantile(gradient, STRONG_EDGE_QUANTILE))
    return float((near[outline] > strong).mean())


def border_kinship(kept: np.ndarray, rgb: np.ndarray) -> float:
    """Share of the frame's edge that is kept and coloured like some unkept edge pixel (within
    ``COLOUR_MATCH_DE`` in Lab; up to ``KINSHIP_SAMPLE`` pixels of each side compared)."""
    on_edge = np.concatenate([kept[0], kept[-1], kept[:, 0], kept[:, -1]])
    colours = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    lab = cv2.cvtColor(colours[None].astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)[0]
    inside, outside = lab[on_edge], lab[~on_edge]
    if not len(inside) or not len(outside):
        return 0.0
    inside = inside[:: max(1, len(inside) // KINSHIP_SAMPLE)]
    outside = outside[:: max(1, len(outside) // KINSHIP_SAMPLE)]
    squared = (inside ** 2).sum(axis=1)[:, None] + (outside ** 2).sum(axis=1)[None, :] - 2.0 * inside @ outside.T
    return float((squared.min(axis=1) <= COLOUR_MATCH_DE ** 2).mean() * on_edge.mean())


def score(quality: dict[str, float]) -> float:
    """The chance that the cutout is right: logistic regression on standardised measurements.
    (Clipping the standardised values to ± 2-4 scales, against values far outside the fitted
    range, lowered the held-out AUC: ``benchmarks/quality_cv.py --explore --clip 3``.)"""
    if not SCORE_MODEL:
        return 1.0
    logit = SCORE_MODEL["intercept"]
    for name, (mean, scale, weight) in SCORE_MODEL["features"].items():
        logit += weight * (feature_value(quality, name) - mean) / scale
    return 1.0 / (1.0 + math.exp(-logit))


def feature_value(quality: dict[str, float], name: str) -> float:
    """A model input: a measurement, ``sqrt_<measurement>`` (spreads the small values) or
    ``multiple_objects`` (1 when that flag's rule holds)."""
    if name.startswith("sqrt_"):
        return math.sqrt(max(0.0, quality[name[5:]]))
    if name == "multiple_objects":
        return float(quality["joined_object"] >= MULTIPLE_OBJECTS_MIN)
    return quality[name]


def flags_for(quality: dict[str, float], notes: list[str]) -> list[str]:
    """The flags these measurements and pipeline notes raise, in QUALITY_FLAGS order."""
    flags = []
    if quality["alpha_coverage"] < EMPTY_ALPHA_MAX:
        flags.append("empty_alpha")
    if quality["alpha_coverage"] > FULL_FRAME_MIN:
        flags.append("full_frame_alpha")
    if quality["unknown_share"] > WIDE_UNKNOWN_MIN:
        flags.append("wide_unknown_band")
    if quality["confidence"] < LOW_CONFIDENCE_MAX:
        flags.append("low_confidence")
    for prefix, flag in _NOTE_FLAGS:
        if any(note.startswith(prefix) for note in notes):
            flags.append(flag)
    if quality.get("score", 1.0) < LIKELY_WRONG_BELOW:
        flags.append("likely_wrong")
    if quality.get("joined_object", 0.0) >= MULTIPLE_OBJECTS_MIN:
        flags.append("multiple_objects")
    return flags


def small_copy(array: np.ndarray) -> np.ndarray:
    """A copy at most ``SIGNAL_SIDE`` long (the array itself when it is smaller)."""
    height, width = array.shape[:2]
    scale = SIGNAL_SIDE / max(height, width)
    if scale >= 1.0:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 1.0
