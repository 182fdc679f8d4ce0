"""2-fold CV of the box path's settings with tight boxes over both visible sets.

Why: the box settings were chosen on GrabCut's loose hand-drawn rectangles alone, and with
tight boxes (what detection datasets give) they lose to a naive crop-and-clip on the
alphamatting photos (``box_tight.py``). Here every setting is scored on both sets with tight
boxes (``box_tight.tight_box``) and chosen on one half, reported on the other (halves: each
set's photos by name, alternating, as in ``tune_cv.py``).

Settings: the crop margin, and what happens after the network:
- ``select``: the box path as shipped (components overlapping the box, the crossing rule, GrabCut
  on the selected mask, matting), ``crossing`` 0.15 or never;
- ``clip``: the whole default finish on the crop (GrabCut, matting), alpha zeroed outside the box;
- ``clip/select``: ``select 0.15`` where the mask runs out across more than 15 % of a box side
  (a neighbour joined to the object), else ``clip``.
The network runs once per photo and margin; the settings reuse its mask.

    .venv/bin/python benchmarks/box_tight_cv.py      # about 10 minutes on 2 cores
"""
from __future__ import annotations

import itertools
import statistics

import numpy as np

from box_tight import photos, tight_box  # noqa: E402  (benchmarks/ is the script's folder)

MARGINS = (0.05, 0.1, 0.2)
FINISHES = ("select 0.15", "select never", "clip", "clip/select")


def finish(pipeline, crop_rgb, mask, inner, how: str) -> np.ndarray:
    """The crop's alpha for one setting (see the module docstring)."""
    from cutout.workers import boxes

    if how == "clip/select":
        how = "select 0.15" if boxes.crossing_share(mask, inner) > 0.15 else "clip"
    if how == "clip":
        alpha = pipeline.finish(crop_rgb, mask).alpha
        clip = np.zeros(alpha.shape, bool)
        clip[inner.slices()] = True
        return alpha * clip
    crossing = 0.15 if how == "select 0.15" else 9.0
    selected, _notes = boxes.select_and_refine(crop_rgb, mask, inner, refine=True, crossing=crossing)
    return boxes._finisher(pipeline, transparent=False).finish(crop_rgb, selected).alpha


def main() -> None:
    import argparse

    from cutout.jobs.spec import PipelineOptions
    from cutout.workers import metrics
    from cutout.workers.boxes import box_region
    from cutout.workers.pipeline import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--margins", nargs="+", type=float, default=list(MARGINS))
    margins = parser.parse_args().margins
    pipeline = Pipeline(PipelineOptions(background="mask"))
    rows = []  # (set, stem, half, setting, iou)
    counters = {"am": 0, "gc": 0}
    for dataset, stem, rgb, truth, ignore in photos():
        half = "AB"[counters[dataset] % 2]
        counters[dataset] += 1
        height, width = truth.shape
        box = box_region(tight_box(truth), width, height)
        for margin in margins:
            crop = box.grown(margin, width, height)
            inner = box.shifted(crop)
            crop_rgb = np.ascontiguousarray(rgb[crop.slices()])
            mask = pipeline.segment([crop_rgb])[0]
            for how in FINISHES:
                alpha = np.zeros((height, width), np.float32)
                alpha[crop.slices()] = finish(pipeline, crop_rgb, mask, inner, how)
                rows.append((dataset, stem, half, (margin, how), metrics.iou(alpha >= 0.5, truth > 0.5, ignore)))
        print(f"  {dataset}/{stem} done", flush=True)
    settings = list(itertools.product(margins, FINISHES))

    def mean(setting, half=None, dataset=None):
        return statistics.fmean(r[4] for r in rows if r[3] == setting and (half is None or r[2] == half)
                                and (dataset is None or r[0] == dataset))

    print("\nmean IoU (tight boxes): all 77 | half A | half B | alphamatting | GrabCut")
    for setting in settings:
        print(f"  margin {setting[0]:4}  {setting[1]:13} {mean(setting):.4f} | {mean(setting, 'A'):.4f} | "
              f"{mean(setting, 'B'):.4f} | {mean(setting, dataset='am'):.4f} | {mean(setting, dataset='gc'):.4f}")
    for fit, test in (("A", "B"), ("B", "A")):
        chosen = max(settings, key=lambda s: mean(s, fit))
        print(f"choose on {fit}: margin {chosen[0]}, {chosen[1]} ({mean(chosen, fit):.4f}); "
              f"on {test}: {mean(chosen, test):.4f}")


if __name__ == "__main__":
    main()
