"""Cache raw soft masks of box crops (GrabCut photos, the dataset's boxes) for the box CV.

Why: the box study (benchmarks/box_cv.py) varies the margin, the component rule and the
post-processing; the network pass is the only slow part, so each crop's raw mask is computed
once per margin and kept as float16 .npy at the crop's size:
    CACHE/<model>_<size>/<stem>_m<margin>.npy      (margin "full": the whole photo, no box)
    CACHE/<model>_<size>/cost.json                 CPU-s (user+sys) of each network call

    nice .venv/bin/python benchmarks/box_masks.py --margins 0.05 0.1 0.2 0.3 full
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cutout.jobs.settings import settings
from cutout.jobs.spec import PipelineOptions

DATA = Path(settings().eval_data) / "grabcut_msrc"


def rect_box(stem: str):
    """The dataset's box: the bounding box of the rect mask's 128 (inside-the-box) pixels."""
    from PIL import Image

    from cutout.workers.boxes import Region

    with Image.open(DATA / "rect" / f"{stem}.png") as image:
        rect = np.asarray(image.convert("L"))
    rows, cols = np.nonzero(rect == 128)
    return Region(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def crop_for(stem: str, margin: str, width: int, height: int):
    """The crop a margin names: ``0.1`` (box grown by 10 %), ``sq0.1`` (then made square)."""
    box = rect_box(stem)
    if margin.startswith("sq"):
        return box.grown(float(margin[2:]), width, height).squared(width, height)
    return box.grown(float(margin), width, height)


def main() -> None:
    from cutout.workers.decode import decode_image
    from cutout.workers.evaluate import cpu_seconds
    from cutout.workers.pipeline import Pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default="/work/main/.cache/boxmasks")
    parser.add_argument("--model", default="isnet-general")
    parser.add_argument("--size", type=int, default=896)
    parser.add_argument("--margins", nargs="+", default=["0.1", "full"])
    args = parser.parse_args()
    folder = Path(args.cache) / f"{args.model}_{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    cost_path = folder / "cost.json"
    costs = json.loads(cost_path.read_text()) if cost_path.exists() else {}
    pipeline = Pipeline(PipelineOptions(model=args.model, seg_size=args.size))
    pipeline.load_models()
    for margin in args.margins:
        for path in sorted((DATA / "image").iterdir()):
            out = folder / f"{path.stem}_m{margin}.npy"
            if out.exists():
                continue
            rgb = decode_image(path.read_bytes()).rgb
            if margin != "full":
                rgb = rgb[crop_for(path.stem, margin, rgb.shape[1], rgb.shape[0]).slices()]
            start = cpu_seconds()
            mask = pipeline.segment_at([np.ascontiguousarray(rgb)], args.size)[0]
            costs[out.stem] = cpu_seconds() - start
            np.save(out, mask.astype(np.float16))
            cost_path.write_text(json.dumps(costs, indent=1))
            print(out.name, f"{costs[out.stem]:.2f} CPU-s", flush=True)


if __name__ == "__main__":
    main()
