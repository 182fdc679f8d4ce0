"""Quality flags on real photos: how many of the alphamatting.com (27) and GrabCut (50) photos
the default pipeline flags, with each photo's measurements, so the thresholds in
``cutout/workers/quality.py`` can be judged against cutouts a person would call good.

    python benchmarks/bench_quality_flags.py [--data ../shared/testdata] [--seg-size 1024] [--json out.json]

Prints one line per photo (coverage, unknown share, confidence, flags, SAD or IoU against the
ground truth) and the flag counts; CPU-seconds beside wall time.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.jobs.settings import settings


def photos(data: Path):
    """(set, name, bytes, ground-truth alpha or mask in 0..1 with NaN where left out)."""
    for path in sorted((data / "alphamatting_lowres" / "image").glob("*.png")):
        gt = np.asarray(Image.open(data / "alphamatting_lowres" / "alpha" / path.name).convert("L"))
        yield "alphamatting", path.stem, path.read_bytes(), gt / 255.0
    for path in sorted((data / "grabcut_msrc" / "image").iterdir()):
        masks = list((data / "grabcut_msrc" / "mask").glob(path.stem + ".*"))
        gt = np.asarray(Image.open(masks[0]).convert("L")).astype(np.float64)
        yield "grabcut", path.stem, path.read_bytes(), np.where(gt == 128, np.nan, gt / 255.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=settings().eval_data)
    parser.add_argument("--model", default="isnet-general")
    parser.add_argument("--seg-size", type=int, default=None,
                        help="one segmentation pass at this size instead of the model's ensemble "
                             "(about 3x faster on CPU)")
    parser.add_argument("--json", default=None, help="write per-photo measurements here")
    args = parser.parse_args()
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.pipeline import Pipeline, PipelineInput

    pipeline = Pipeline(PipelineOptions(model=args.model, seg_size=args.seg_size))
    pipeline.load_models()
    rows, flags = [], Counter()
    wall, cpu = time.perf_counter(), time.process_time()
    for group, name, data, gt in photos(Path(args.data)):
        (outcome,) = pipeline.run([PipelineInput(name, data)])
        alpha = np.asarray(Image.open(io.BytesIO(outcome.data)))[:, :, 3] / 255.0
        known = ~np.isnan(gt)
        score = (np.abs(alpha - gt)[known].sum() / 1000 if group == "alphamatting" else
                 float(((alpha >= .5) & (gt >= .5))[known].sum() / max(1, ((alpha >= .5) | (gt >= .5))[known].sum())))
        row = {"set": group, "name": name, **outcome.quality, "flags": outcome.flags,
               "notes": outcome.notes, "sad" if group == "alphamatting" else "iou": round(score, 4),
               "gt_coverage": round(float((gt[known] >= 0.5).mean()), 4)}
        rows.append(row)
        flags.update(outcome.flags)
        print(json.dumps(row), flush=True)
    flagged = sum(1 for row in rows if row["flags"])
    print(f"{flagged} of {len(rows)} photos flagged; flag counts {dict(flags)}")
    print(f"wall {time.perf_counter() - wall:.1f} s, CPU {time.process_time() - cpu:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
