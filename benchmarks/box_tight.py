"""Box hints with tight boxes: the box path against a naive crop-and-clip, on both visible sets.

Why: detection datasets give tight boxes, not GrabCut's loose hand-drawn rectangles, so this
measures the box path the way such a dataset would use it. Each photo's box is the bounding box
of its ground truth (alpha > 0.5 / GrabCut mask > 192) grown by ``PAD`` of its width and height
on each side. Two methods, both `balanced` defaults:
- ``box path``: ``cutout.workers.boxes.cut_out_box`` (what ``--box-column`` and ``box=`` run);
- ``naive``: crop the box grown by ``NAIVE_MARGIN``, run the whole default pipeline on the
  crop, zero the alpha outside the box.
Scores: IoU of alpha >= 0.5 (GrabCut's 128 band left out), whole-image SAD on alphamatting.

    .venv/bin/python benchmarks/box_tight.py          # about 6 minutes on 2 cores
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.jobs.settings import settings

DATA = Path(settings().eval_data)
PAD = 0.04  # the tight box grown by 4 % of its size on each side
NAIVE_MARGIN = 0.10


def photos():
    """(set, stem, rgb, truth as 0..1 alpha, ignore mask or None) for both visible sets."""
    for path in sorted((DATA / "alphamatting_lowres" / "image").glob("*.png")):
        truth = np.asarray(Image.open(path.parent.parent / "alpha" / path.name).convert("L")) / 255.0
        yield "am", path.stem, np.asarray(Image.open(path).convert("RGB")), truth, None
    for path in sorted((DATA / "grabcut_msrc" / "image").iterdir()):
        raw = np.asarray(Image.open(DATA / "grabcut_msrc" / "mask" / f"{path.stem}.png").convert("L"))
        yield ("gc", path.stem, np.asarray(Image.open(path).convert("RGB")), (raw > 192).astype(np.float32),
               (raw > 64) & (raw < 192))


def tight_box(truth: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, w, h) of the truth's bounding box grown by ``PAD``, clamped to the image."""
    rows, cols = np.nonzero(truth > 0.5)
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    dx, dy = PAD * (x1 - x0), PAD * (y1 - y0)
    height, width = truth.shape
    left, top = max(0.0, x0 - dx), max(0.0, y0 - dy)
    return left, top, min(width, x1 + dx) - left, min(height, y1 + dy) - top


def cv_boxes():
    """The 127 boxes of the box CV studies: each photo's tight box on both visible sets, and
    GrabCut's own ``rect/`` boxes; halves as in the preset study (each set's photos by name,
    alternating), a photo's two boxes in one half. Yields (set, stem, half, kind, box in pixels
    of the photo as a ``Region``, rgb, truth, ignore)."""
    from cutout.workers.boxes import box_region, load_eval_boxes

    rects = load_eval_boxes(DATA / "grabcut_msrc" / "rect")
    counters = {"am": 0, "gc": 0}
    for dataset, stem, rgb, truth, ignore in photos():
        half = "AB"[counters[dataset] % 2]
        counters[dataset] += 1
        height, width = truth.shape
        boxes = [("tight", tight_box(truth))] + ([("rect", rects[stem])] if dataset == "gc" else [])
        for kind, box in boxes:
            yield dataset, stem, half, kind, box_region(box, width, height), rgb, truth, ignore


def print_cv_table(rows: list[dict], rules, mean, label, baseline) -> None:
    """Each rule's mean IoU (``mean(rows, rule, **where)``) over all boxes, each half, each kind
    of box and set; then each half's choice judged on the other, beside ``baseline``'s."""
    print("\nmean IoU: all 127 | half A | half B | GrabCut rect/ | tight | tight alphamatting | tight GrabCut")
    for rule in rules:
        print(f"  {label(rule)}  {mean(rows, rule):.4f} | {mean(rows, rule, half='A'):.4f} | "
              f"{mean(rows, rule, half='B'):.4f} | {mean(rows, rule, kind='rect'):.4f} | "
              f"{mean(rows, rule, kind='tight'):.4f} | {mean(rows, rule, kind='tight', set='am'):.4f} | "
              f"{mean(rows, rule, kind='tight', set='gc'):.4f}")
    for fit, test in (("A", "B"), ("B", "A")):
        chosen = max(rules, key=lambda rule: mean(rows, rule, half=fit))
        print(f"choose on {fit}: {label(chosen).strip()} ({mean(rows, chosen, half=fit):.4f}); on {test}: "
              f"{mean(rows, chosen, half=test):.4f} ({label(baseline).strip()} {mean(rows, baseline, half=test):.4f})")


def naive(pipeline, rgb: np.ndarray, box) -> np.ndarray:
    from cutout.workers.boxes import box_region

    height, width = rgb.shape[:2]
    region = box_region(box, width, height)
    crop = region.grown(NAIVE_MARGIN, width, height)
    crop_rgb = np.ascontiguousarray(rgb[crop.slices()])
    alpha = np.zeros((height, width), np.float32)
    alpha[crop.slices()] = pipeline.finish(crop_rgb, pipeline.segment([crop_rgb])[0]).alpha
    clip = np.zeros((height, width), bool)
    clip[region.slices()] = True
    return alpha * clip


def main() -> None:
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers import metrics
    from cutout.workers.boxes import box_region, cut_out_box
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(PipelineOptions(background="mask"))
    scores: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for dataset, stem, rgb, truth, ignore in photos():
        box = tight_box(truth)
        height, width = truth.shape
        outputs = {"box path": cut_out_box(pipeline, rgb, box_region(box, width, height)).alpha,
                   "naive": naive(pipeline, rgb, box)}
        line = []
        for method, alpha in outputs.items():
            iou = metrics.iou(alpha >= 0.5, truth > 0.5, ignore)
            scores.setdefault((dataset, method), []).append((iou, metrics.sad(alpha, truth)))
            line.append(f"{method} IoU {iou:.3f}")
        print(f"  {dataset}/{stem}: {', '.join(line)}", flush=True)
    for (dataset, method), values in sorted(scores.items()):
        ious, sads = zip(*values)
        sad = f"  SAD {statistics.fmean(sads):.2f} / {statistics.median(sads):.2f}" if dataset == "am" else ""
        print(f"{dataset} {method:9} mean IoU {statistics.fmean(ious):.4f}{sad}  ({len(ious)} photos)")


if __name__ == "__main__":
    main()
