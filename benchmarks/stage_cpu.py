"""Where a preset's CPU goes per photo: the networks (segment) against everything after them
(calibrate, GrabCut, matting, objects, composite, score), in CPU-seconds of this process
(``time.process_time``: every thread, so onnxruntime's threads count).

Why: the cascade's cost model (benchmarks/quality_cv.py) needs the price of a rerun and of the
part of ``fast`` that a photo sent straight to ``balanced`` no longer pays; the whole-process
bench (bench_cost.py) gives only totals.

    for p in fast balanced; do       # one process per preset: each pays its own imports and loads
        .venv/bin/python benchmarks/stage_cpu.py --presets $p --out .cache/stage_cpu.json
    done                             # per photo, read by quality_cv.py --stage-cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.jobs.settings import settings
from cutout.jobs.spec import PipelineOptions
from cutout.workers.pipeline import Pipeline

DATA = Path(settings().eval_data)
SETS = {"am": DATA / "alphamatting_lowres", "gc": DATA / "grabcut_msrc"}


def photos(name: str) -> list[Path]:
    folder = SETS[name] / "image"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))


def measure(preset: str, paths: list[Path]) -> dict[str, list[float]]:
    """Per photo CPU-s of the networks and of the rest; the model load once, apart."""
    pipe = Pipeline(PipelineOptions(preset=preset))
    start = time.process_time()
    pipe.load_models()
    load = time.process_time() - start
    warm = np.asarray(Image.open(paths[0]).convert("RGB"))
    pipe.finish(warm, pipe.segment([warm])[0])  # untimed: numba's kernels, first-call costs
    seg, rest = [], []
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        start = time.process_time()
        raw = pipe.segment_raw([rgb])[0]
        middle = time.process_time()
        pipe.finish(rgb, pipe.calibrate(raw), disagreement=getattr(raw, "disagreement", None))
        seg.append(middle - start)
        rest.append(time.process_time() - middle)
    return {"load": load, "segment": seg, "finish": rest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["fast", "balanced"])
    parser.add_argument("--sets", nargs="+", default=["am", "gc"], choices=sorted(SETS))
    parser.add_argument("--limit", type=int, default=None, help="the first N photos of each set")
    parser.add_argument("--out", help="write the per-photo figures here (JSON)")
    args = parser.parse_args()
    # --out merges into what the file holds: run one preset per process, so each pays its own imports
    per_photo: dict[str, dict] = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    for name in args.sets:
        paths = photos(name)[:args.limit]
        for preset in args.presets:
            got = measure(preset, paths)
            for path, seg_s, finish_s in zip(paths, got["segment"], got["finish"]):
                per_photo.setdefault(f"{name}/{path.stem}", {})[preset] = {"segment": seg_s, "finish": finish_s}
            per_photo.setdefault("_load", {})[f"{name}/{preset}"] = got["load"]
            seg, rest = statistics.fmean(got["segment"]), statistics.fmean(got["finish"])
            print(f"{name} {preset:9} photos {len(paths):3}  load {got['load']:5.2f}  segment {seg:5.2f}  "
                  f"finish {rest:5.2f}  total {seg + rest:5.2f} CPU-s per photo "
                  f"(finish median {statistics.median(got['finish']):.2f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(per_photo, indent=1))


if __name__ == "__main__":
    main()
