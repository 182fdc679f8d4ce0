"""2-fold cross-validated choice of the box settings (margin, spill, component rule).

Why: a box hint's gain depends on how much context the crop keeps (margin), how far the kept
alpha may leave the box (spill), which connected components count as the boxed object
(min_inside: the share of a component that must lie inside the box) and when GrabCut may
relabel the network's sure foreground (crossing: the share of a box side the mask runs out
across). Choosing them on the
photos they are scored on would flatter them, so the 50 GrabCut photos are split in two
halves (sorted names, alternating) and each fold chooses on one half and reports the other.

Scores are mask IoU (128 band left out) after the pipeline's own steps on the crop:
calibration ramp, component selection and GrabCut refinement (``select_and_refine``, the
balanced preset refines), threshold 0.5; the raw network masks come from benchmarks/box_masks.py's cache. The shipped values are
the CV choice; ``cutout eval --data .../grabcut_msrc --boxes .../rect`` then confirms them end
to end (matting included).

    nice .venv/bin/python benchmarks/box_cv.py --cache /work/main/.cache/boxmasks/isnet-general_896
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import numpy as np

from box_masks import DATA, crop_for, rect_box  # noqa: E402  (benchmarks/ is the script's folder)

RAMP = (0.05, 0.55)
SPILLS = (0.0,)
MIN_INSIDE = (0.0,)
CROSSINGS = (0.15, 0.2, 0.3, 9.0)  # 9: never (GrabCut keeps the sure foreground)


def ground_truth(stem: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    with Image.open(DATA / "mask" / f"{stem}.png") as image:
        mask = np.asarray(image.convert("L"))
    return mask > 192, (mask > 64) & (mask < 192)


def photo(stem: str) -> np.ndarray:
    from cutout.workers.decode import decode_image

    path = next((DATA / "image").glob(f"{stem}.*"))
    return decode_image(path.read_bytes()).rgb


def score(stem, rgb, raw, margin, spill, min_inside, crossing, clip_only=False) -> float:
    """IoU of the box path's mask (before matting) for one photo and one setting."""
    from cutout.workers.boxes import Region, select_and_refine
    from cutout.workers.refine import refine_with_grabcut

    height, width = rgb.shape[:2]
    box = rect_box(stem)
    crop = Region(0, 0, width, height) if margin == "full" else crop_for(stem, margin, width, height)
    inner = box.shifted(crop)
    crop_rgb = np.ascontiguousarray(rgb[crop.slices()])
    mask = np.clip((raw.astype(np.float32) - RAMP[0]) / (RAMP[1] - RAMP[0]), 0, 1)
    if clip_only:  # the naive version: everything inside the box, nothing outside, then GrabCut
        limit = np.zeros_like(mask)
        limit[inner.slices()] = 1
        mask, _ = refine_with_grabcut(crop_rgb, mask * limit)
    else:
        mask, _ = select_and_refine(crop_rgb, mask, inner, refine=True, spill=spill,
                                    min_inside=min_inside, crossing=crossing)
    full = np.zeros((height, width), bool)
    full[crop.slices()] = mask >= 0.5
    gt, ignore = ground_truth(stem)
    keep = ~ignore
    inter, union = (full & gt)[keep].sum(), (full | gt)[keep].sum()
    return float(inter / union) if union else 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="/work/main/.cache/boxmasks/isnet-general_896")
    parser.add_argument("--margins", nargs="+", default=["0.05", "0.1", "0.2", "0.3", "full"])
    args = parser.parse_args()
    cache = Path(args.cache)
    stems = sorted(p.stem for p in (DATA / "image").iterdir())
    margins = [m for m in args.margins if all((cache / f"{s}_m{m}.npy").exists() for s in stems)]
    print(f"margins with every photo cached: {margins}")
    rgbs = {s: photo(s) for s in stems}
    table: dict[tuple, dict[str, float]] = {}
    for margin in margins:
        raws = {s: np.load(cache / f"{s}_m{margin}.npy") for s in stems}
        table[("naive", margin)] = {s: score(s, rgbs[s], raws[s], margin, 0, 0, 9, True) for s in stems}
        for spill, min_inside, crossing in itertools.product(SPILLS, MIN_INSIDE, CROSSINGS):
            table[(margin, spill, min_inside, crossing)] = {
                s: score(s, rgbs[s], raws[s], margin, spill, min_inside, crossing) for s in stems}
        print(f"  margin {margin} scored", flush=True)
    halves = {"A": stems[0::2], "B": stems[1::2]}

    def mean(key, names):
        return statistics.fmean(table[key][n] for n in names)

    candidates = [k for k in table if k[0] != "naive"]
    for tune, report in (("A", "B"), ("B", "A")):
        best = max(candidates, key=lambda k: mean(k, halves[tune]))
        print(f"fold: choose on {tune}, report on {report}: margin {best[0]} spill {best[1]} min_inside "
              f"{best[2]} crossing {best[3]}: IoU {mean(best, halves[tune]):.4f} on {tune}, "
              f"{mean(best, halves[report]):.4f} on {report}")
    best_all = max(candidates, key=lambda k: mean(k, stems))
    print(f"all 50 (for the record): best {best_all}: {mean(best_all, stems):.4f}")
    for key in sorted(candidates, key=lambda k: -mean(k, stems))[:10]:
        print(f"  {str(key):36} all {mean(key, stems):.4f}  A {mean(key, halves['A']):.4f}  B {mean(key, halves['B']):.4f}")
    for key in (k for k in table if k[0] == "naive"):
        print(f"  naive crop-and-clip, GrabCut, margin {key[1]:5}: all {mean(key, stems):.4f}  "
              f"A {mean(key, halves['A']):.4f}  B {mean(key, halves['B']):.4f}")

if __name__ == "__main__":
    main()
