"""2-fold CV of dropping a box's neighbour parts: parts of the cutout that mostly lie outside
the box, or that are small next to the boxed object.

Why: inside a box the shipped path keeps whatever the network kept there, so a neighbour that
reaches into the box (the boy beside the boxed one, a starting block under a diver) stays as a
strip or a blob. Each box is cut out once with the shipped path (``cut_out_box``, crop output;
its refined mask is the unclipped one, so a part's share inside the box is known), the crops
are cached, and each rule is applied to the finished alpha: the pixels nearest to a dropped
part of the refined mask go. Rule families (listed before the first run):
- ``inside t``: drop a part when less than t of its area (in the crop) lies inside the box;
- ``small s``: drop a part whose area inside the box is below s times the largest part's;
- ``both t s``: either;
- ``neck t``: as ``inside t``, with parts joined by a strip narrower than ``quality.NECK``
  counted as separate (a hand resting on the neighbour, as ``--objects main`` cuts them);
- ``early t``: as ``neck t``, decided on the mask the finishing starts from (before GrabCut's
  refinement), so the box's limit can carry it into a single matting;
- ``shipped t``: ``neck t`` as ``boxes.neighbour_parts`` runs it (on a copy at most 512 px long).
The part with the most area inside the box always stays. Boxes and halves as in
``box_fill_cv.py`` (127 boxes: each photo's tight box on both sets, GrabCut's own ``rect/``).

    .venv/bin/python benchmarks/box_parts_cv.py --cache .cache/box-parts   # about 6 minutes
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from box_tight import cv_boxes, print_cv_table  # noqa: E402  (benchmarks/ is the script's folder)

INSIDE = (0.2, 0.3, 0.4, 0.5, 0.6)
SMALL = (0.01, 0.02, 0.05, 0.1)
SQUARE = [False]  # --square: the crop grown to a square (as far as the photo allows) first
RULES = ([("none", 0.0, 0.0)] + [("inside", t, 0.0) for t in INSIDE] + [("small", 0.0, s) for s in SMALL]
         + [("both", t, s) for t in (0.3, 0.5) for s in (0.02, 0.05)] + [("neck", t, 0.0) for t in INSIDE]
         + [("early", t, 0.0) for t in INSIDE] + [("shipped", t, 0.0) for t in INSIDE])


def cached_boxes(cache: Path):
    """(set, stem, half, kind, crop arrays, truth, ignore) per box; each box's crop result is
    computed once and kept in ``cache``."""
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.pipeline import Pipeline

    cache.mkdir(parents=True, exist_ok=True)
    pipeline = None
    for dataset, stem, half, kind, region, rgb, truth, ignore in cv_boxes():
        path = cache / f"{dataset}-{stem}-{kind}.npz"
        if not path.exists():
            pipeline = pipeline or Pipeline(PipelineOptions(background="mask"))
            np.savez_compressed(path, **crop_arrays(pipeline, rgb, region, SQUARE[0]))
        yield dataset, stem, half, kind, dict(np.load(path)), truth, ignore


def crop_arrays(pipeline, rgb, region, square: bool = False) -> dict:
    """The shipped box path's steps (``cut_out_box``) on one box, kept for the rules: the mask
    the finishing starts from (the network's, or GrabCut's where it falls back), the refined
    mask and the finished alpha of the crop, and where the crop and the box lie."""
    from cutout.workers.boxes import BOX_MARGIN, MIN_FILL, box_fill, box_mask, finish_box

    height, width = rgb.shape[:2]
    crop = region.grown(BOX_MARGIN, width, height)
    if square:
        crop = crop.squared(width, height)
    inner = region.shifted(crop)
    crop_rgb = np.ascontiguousarray(rgb[crop.slices()])
    start = box_mask(pipeline, crop_rgb, inner)
    if box_fill(start, inner) < MIN_FILL:
        start = box_mask(pipeline, crop_rgb, inner, from_box=True)
    result = finish_box(pipeline, crop_rgb, inner, start, None, crop_output=True)
    return {"alpha": result.alpha, "mask": result.mask, "start": start,
            "crop": [crop.x0, crop.y0, crop.x1, crop.y1], "inner": [inner.x0, inner.y0, inner.x1, inner.y1]}


def parts_table(mask: np.ndarray, inner, neck: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of the refined mask's parts, each part's share inside the box and area inside it."""
    from cutout.workers.quality import kept_parts

    labels, count = kept_parts(mask >= 0.5, neck)
    x0, y0, x1, y1 = inner
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(float)
    inside = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=count + 1)[1:].astype(float)
    return labels, inside / np.maximum(areas, 1), inside


def apply_rule(arrays: dict, rule) -> np.ndarray:
    from cutout.workers.objects import nearest_part

    kind, t, s = rule
    alpha = arrays["alpha"]
    if kind == "none":
        return alpha
    if kind == "shipped":  # cutout.workers.boxes.neighbour_parts, as finish_box runs it
        from cutout.workers.boxes import Region, neighbour_parts

        owned = neighbour_parts(arrays["mask"], Region(*(int(v) for v in arrays["inner"])), min_inside=t)
        return alpha if owned is None else np.where(owned, 0.0, alpha).astype(np.float32)
    from cutout.workers.quality import NECK

    source = arrays["start"] if kind == "early" else arrays["mask"]
    labels, share, inside = parts_table(source, arrays["inner"], NECK if kind in ("neck", "early") else 0.0)
    if len(inside) < 2:
        return alpha
    drop = np.zeros(len(inside), bool)
    if kind in ("inside", "both", "neck", "early"):
        drop |= share < t
    if kind in ("small", "both"):
        drop |= inside < s * inside.max()
    drop[int(np.argmax(inside))] = False
    if not drop.any():
        return alpha
    owner = nearest_part(labels)
    return np.where(np.concatenate([[False], drop])[owner], 0.0, alpha).astype(np.float32)


def score(arrays: dict, alpha_crop: np.ndarray, truth, ignore) -> float:
    from cutout.workers import metrics

    x0, y0, x1, y1 = arrays["crop"]
    alpha = np.zeros(truth.shape, np.float32)
    alpha[y0:y1, x0:x1] = alpha_crop
    return metrics.iou(alpha >= 0.5, truth > 0.5, ignore)


def mean(rows, rule, **where) -> float:
    return statistics.fmean(r[rule] for r in rows if all(r[k] == v for k, v in where.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/box-parts"))
    parser.add_argument("--square", action="store_true", help="square crops (Region.squared)")
    args = parser.parse_args()
    SQUARE[0] = args.square
    rows = []
    for dataset, stem, half, kind, arrays, truth, ignore in cached_boxes(args.cache):
        row = {"set": dataset, "stem": stem, "half": half, "kind": kind}
        for rule in RULES:
            row[rule] = score(arrays, apply_rule(arrays, rule), truth, ignore)
        changed = [f"{r[0]} {r[1]} {r[2]}: {row[r]:.3f}" for r in RULES[1:] if abs(row[r] - row[RULES[0]]) > 1e-4]
        print(f"  {dataset}/{stem} {kind:5} {row[RULES[0]]:.3f}  {'; '.join(changed)}", flush=True)
        rows.append(row)
    print_cv_table(rows, RULES, mean, lambda rule: f"{rule[0]:6} {rule[1]:4} {rule[2]:4}", RULES[0])


if __name__ == "__main__":
    main()
