"""Quality signals of one output: a few numbers measured from the arrays the pipeline already
holds, and flags (``cutout.jobs.records.QUALITY_FLAGS``) when they look wrong, so that among a
million outputs the doubtful ones can be counted, shown and rerun without looking at each.

Measurements (all 0..1):
    ``alpha_coverage``  share of the frame the cutout keeps (alpha ≥ 0.5).
    ``unknown_share``   share of the frame the trimap left to matting (when no trimap was built:
                        the share the mask leaves between the trimap thresholds).
    ``confidence``      mean of |2·mask − 1| over the frame: 1 when the model was sure of every
                        pixel, 0 when it said 0.5 everywhere.
"""
from __future__ import annotations

import numpy as np

# Thresholds, checked on the 27 alphamatting.com + 50 GrabCut photos with IS-Net
# (benchmarks/bench_quality_flags.py): coverage there 0.05..0.71, unknown share 0.04..0.22,
# confidence 0.984..0.998; 2 of 77 flagged, both bad cutouts (alphamatting SAD 73 and 226).
EMPTY_ALPHA_MAX = 0.005  # under 0.5 % of the frame kept: the subject was missed, not just small
FULL_FRAME_MIN = 0.97  # over 97 % kept: the background is still there (real subjects leave a margin)
WIDE_UNKNOWN_MIN = 0.2  # a fifth of the frame uncertain: the model hesitated far beyond the edges
LOW_CONFIDENCE_MAX = 0.98  # the calibrated mask is near 0 or 1 almost everywhere (≥ 0.984 on all 77)
KEPT_ALPHA = 0.5  # a pixel counts as kept from this alpha up

_NOTE_FLAGS = (("matting-skipped", "matting_skipped"), ("matting-fallback", "matting_degraded"))


def measure(
    alpha: np.ndarray, mask: np.ndarray, trimap: np.ndarray | None, notes: list[str],
    *, fg_threshold: float = 0.95, bg_threshold: float = 0.05,
) -> tuple[dict[str, float], list[str]]:
    """(measurements, flags) for one output; see the module docstring."""
    if trimap is not None:
        unknown = float(np.count_nonzero(trimap == 128)) / trimap.size
    else:
        unknown = float(np.count_nonzero((mask > bg_threshold) & (mask < fg_threshold))) / mask.size
    quality = {
        "alpha_coverage": float(np.count_nonzero(alpha >= KEPT_ALPHA)) / alpha.size,
        "unknown_share": unknown,
        "confidence": float(np.abs(2.0 * mask.astype(np.float32) - 1.0).mean()),
    }
    return {k: round(v, 4) for k, v in quality.items()}, flags_for(quality, notes)


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
    return flags
