"""2-fold CV of when a box's cutout falls back from the network to GrabCut started from the box.

Why: with a box, most of the remaining misses are the network keeping the wrong thing inside
the box (a pot and a stem instead of the ball of leaves above them, a small part of a subject),
and GrabCut started from the same box finds those objects. Each box is cut out both ways with
the shipped box path (``cutout.workers.boxes.finish_box`` from the network's mask, or GrabCut
from the box, then the same refinement, trimap and matting), and a rule picks one per box.
Rule families, each with a few thresholds:
- ``mask fill t`` (shipped): GrabCut when the network's calibrated mask covers less than t of
  the box, decided before refinement and matting, so a fallback costs one GrabCut and no
  second matting (added after a first run that had only the families below; docs/results.md);
- ``fill t``: GrabCut when the network's finished cutout covers less than t of the box;
- ``ratio t``: GrabCut when the network's cutout covers less than t times GrabCut's;
- ``agree t``: GrabCut when the two agree (IoU) below t and GrabCut covers more;
- ``score d``: GrabCut when its quality score beats the network's by more than d.
Boxes: each photo's tight box (its truth's bounding box + 4 %, ``box_tight.tight_box``) on both
visible sets, and GrabCut's own ``rect/`` boxes: 127 boxes. Halves as in the preset study (each
set's photos by name, alternating); a photo's two GrabCut boxes stay in one half. Chosen on one
half (mean IoU over all its boxes), reported on the other.

    .venv/bin/python benchmarks/box_fill_cv.py     # about 12 minutes on 2 cores
"""
from __future__ import annotations

import statistics

import numpy as np

from box_tight import cv_boxes, print_cv_table  # noqa: E402  (benchmarks/ is the script's folder)

FILLS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
RULES = ([("net", 0.0)] + [("mask fill", t) for t in FILLS] + [("fill", t) for t in FILLS]
         + [("ratio", t) for t in (0.3, 0.4, 0.5, 0.6, 0.7)]
         + [("agree", t) for t in (0.5, 0.6, 0.7, 0.8)] + [("score", d) for d in (0.0, 0.1, 0.2, 0.3)])


def both_ways(pipeline, rgb, region):
    """The box's crop, its place in the crop, the network's mask's share of the box, and the
    crop's results from the network's mask and from GrabCut started from the box."""
    from cutout.workers.boxes import BOX_MARGIN, box_fill, box_mask, finish_box

    crop = region.grown(BOX_MARGIN, rgb.shape[1], rgb.shape[0])
    inner = region.shifted(crop)
    crop_rgb = np.ascontiguousarray(rgb[crop.slices()])
    masks = {way: box_mask(pipeline, crop_rgb, inner, from_box=way == "gc") for way in ("net", "gc")}
    results = {way: finish_box(pipeline, crop_rgb, inner, mask, None, crop_output=True)
               for way, mask in masks.items()}
    return crop, inner, box_fill(masks["net"], inner), results


def measure(row: dict, crop, inner, mask_fill, results, truth, ignore) -> None:
    """IoU of each way against the truth, and the rules' inputs."""
    from cutout.workers import metrics

    area = inner.width * inner.height
    row["mask_fill"] = mask_fill
    kept = {}
    for way, result in results.items():
        alpha = np.zeros(truth.shape, np.float32)
        alpha[crop.slices()] = result.alpha
        kept[way] = alpha >= 0.5
        row[f"{way}_iou"] = metrics.iou(kept[way], truth > 0.5, ignore)
        row[f"{way}_fill"] = float(kept[way].sum()) / area
        row[f"{way}_score"] = result.quality["score"]
    row["agree"] = float((kept["net"] & kept["gc"]).sum()) / max(1, int((kept["net"] | kept["gc"]).sum()))


def picks_grabcut(row: dict, rule) -> bool:
    kind, t = rule
    return {"net": False,
            "fill": row["net_fill"] < t,
            "mask fill": row["mask_fill"] < t,
            "ratio": row["net_fill"] < t * row["gc_fill"],
            "agree": row["agree"] < t and row["gc_fill"] > row["net_fill"],
            "score": row["gc_score"] > row["net_score"] + t}[kind]


def mean(rows, rule, **where) -> float:
    chosen = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return statistics.fmean(r["gc_iou"] if picks_grabcut(r, rule) else r["net_iou"] for r in chosen)


def main() -> None:
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(PipelineOptions(background="mask"))
    rows = []
    for dataset, stem, half, kind, region, rgb, truth, ignore in cv_boxes():
        row = {"set": dataset, "stem": stem, "half": half, "kind": kind}
        measure(row, *both_ways(pipeline, rgb, region), truth, ignore)
        rows.append(row)
        print(f"  {dataset}/{stem} {kind:5} network {row['net_iou']:.3f} (fill {row['net_fill']:.2f}, "
              f"mask {row['mask_fill']:.2f}) "
              f"GrabCut {row['gc_iou']:.3f} (fill {row['gc_fill']:.2f})", flush=True)
    print_cv_table(rows, RULES, mean, lambda rule: f"{rule[0]:9} {rule[1]:4}", ("net", 0.0))
    for rule in (("mask fill", 0.2),):
        switched = [f"{r['set']}/{r['stem']} {r['kind']} {r['net_iou']:.2f}->{r['gc_iou']:.2f}"
                    for r in rows if picks_grabcut(r, rule)]
        print(f"{rule[0]} {rule[1]} switches {len(switched)}: {', '.join(switched)}")


if __name__ == "__main__":
    main()
