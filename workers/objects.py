"""Keep the photo's main object when the network kept several of similar size.

A salient-object network keeps everything that stands out: the person and the one beside them,
the boolean sign and its post, the desk around the laptop. When the kept area falls apart into
two or more parts of similar size (``quality.second_object`` after cutting narrow necks, the
signal behind the ``multiple_objects`` flag), the photo is usually about one of them, and the
one nearest the centre, weighted by its size, is the one a photographer framed. The others are
dropped (unless there are more than two of similar size: a collection, such as coins, stays): each kept pixel belongs to the part it is nearest to, so a part keeps its thin limbs
and soft edge, and the cut between two joined parts runs midway along their neck.

Chosen by 2-fold cross-validation over both visible sets (``benchmarks/objects_cv.py``;
docs/results.md, "Main object"). ``--objects all`` keeps every part (a pair of shoes, a shelf).
"""
from __future__ import annotations

import cv2
import numpy as np

from cutout.workers.quality import KEPT_ALPHA, NECK, kept_parts, small_copy

# A second part at least this large against the largest (after cutting necks) means several
# objects. Both CV halves tie from 0.3 to 0.5 (no visible output lies between); the middle is
# shipped. (The multiple_objects flag, at 0.2, also marks the closer calls left alone.)
MAIN_OBJECT_MIN = 0.4
# More parts of similar size than this make a collection (coins on a table, a shelf, a group),
# not a subject and a neighbour: every part stays. (Every visible photo the rule changes has 2;
# scikit-image's `coins`, 24 coins, lost 23 of them without this limit.)
MAX_SIMILAR_PARTS = 2


def keep_main_object(alpha: np.ndarray, *, min_second: float = MAIN_OBJECT_MIN,
                     by_centre: bool = True) -> tuple[np.ndarray, str | None]:
    """``alpha`` with only its main part, and a note; unchanged (note None) when it has one part,
    when the others are small next to the largest, or when it holds a collection (more than
    ``MAX_SIMILAR_PARTS`` parts of similar size). ``by_centre=False`` keeps the largest part
    (the rule the cross-validation compared against)."""
    height, width = alpha.shape
    small = small_copy(alpha)
    parts, count = kept_parts(small >= KEPT_ALPHA, NECK)
    if count < 2:
        return alpha, None
    areas = np.bincount(parts.ravel(), minlength=count + 1)[1:].astype(np.float64)
    similar = int(np.count_nonzero(areas >= min_second * areas.max()))
    if not 2 <= similar <= MAX_SIMILAR_PARTS:
        return alpha, None
    weights = areas * _closeness_to_centre(parts, count) if by_centre else areas
    main = 1 + int(np.argmax(weights))
    owned = nearest_part(parts) == main
    if small.shape != alpha.shape:
        owned = cv2.resize(owned.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    note = f"main-object: kept the main one of {count} parts (--objects all keeps every part)"
    return np.where(owned, alpha, 0.0).astype(alpha.dtype, copy=False), note


def _closeness_to_centre(parts: np.ndarray, count: int) -> np.ndarray:
    """1 minus each part's centroid distance from the image centre (as fractions of the
    width and height): 1 at the centre, about 0.3 in a corner."""
    height, width = parts.shape
    rows, cols = np.nonzero(parts)
    labels = parts[rows, cols]
    sizes = np.bincount(labels, minlength=count + 1)[1:]
    cx = np.bincount(labels, weights=cols, minlength=count + 1)[1:] / sizes
    cy = np.bincount(labels, weights=rows, minlength=count + 1)[1:] / sizes
    return 1.0 - np.hypot(cx / width - 0.5, cy / height - 0.5)


def nearest_part(parts: np.ndarray) -> np.ndarray:
    """For every pixel, the label of the part nearest to it (Euclidean distance)."""
    background = np.where(parts > 0, 0, 255).astype(np.uint8)
    _distance, seeds = cv2.distanceTransformWithLabels(background, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
    # DIST_LABEL_PIXEL numbers every zero pixel (the parts' pixels) in scan order; map each
    # number back to the part that pixel belongs to
    owner = np.zeros(int(seeds.max()) + 1, np.int32)
    rows, cols = np.nonzero(background == 0)
    owner[seeds[rows, cols]] = parts[rows, cols]
    return owner[seeds]
