"""Where a preset's CPU goes per photo: the networks (segment) against everything after them
(calibrate, GrabCut, matting, objects, composite, score), in CPU-seconds of this process
(``time.process_time``: every thread, so onnxruntime's threads count).

Why: the cascade's cost model (benchmarks/quality_cv.py --stage-cpu) needs the price of a rerun
and of the part of ``fast`` that a photo sent straight to ``balanced`` no longer pays; the
whole-process bench (bench_cost.py) gives only totals. The presets run side by side, photo by
photo (their order alternating), in one process: this machine's speed drifts by a third within
the hour, so prices measured in separate runs do not compare.

    .venv/bin/python benchmarks/stage_cpu.py --presets fast balanced --out .cache/stage_cpu.json
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


def loaded(preset: str, warm: np.ndarray) -> tuple[Pipeline, float]:
    """The preset's pipeline with its models loaded (CPU-s of the load), warmed up untimed.
    ``nested``: both presets' models stay loaded together (the cascade's own arrangement)."""
    pipe = Pipeline(PipelineOptions(preset=preset), nested=True)
    start = time.process_time()
    pipe.load_models()
    load = time.process_time() - start
    pipe.finish(warm, pipe.segment([warm])[0])  # numba's kernels, first-call costs
    return pipe, load


def one_photo(pipe: Pipeline, rgb: np.ndarray) -> dict[str, float]:
    start = time.process_time()
    raw = pipe.segment_raw([rgb])[0]
    middle = time.process_time()
    pipe.finish(rgb, pipe.calibrate(raw), disagreement=getattr(raw, "disagreement", None))
    return {"segment": middle - start, "finish": time.process_time() - middle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["fast", "balanced"])
    parser.add_argument("--sets", nargs="+", default=["am", "gc"], choices=sorted(SETS))
    parser.add_argument("--limit", type=int, default=None, help="the first N photos of each set")
    parser.add_argument("--out", help="write the per-photo figures here (JSON)")
    args = parser.parse_args()
    warm = np.asarray(Image.open(photos(args.sets[0])[0]).convert("RGB"))
    pipes, per_photo = {}, {"_load": {}}
    for preset in args.presets:  # the first pays the lazy imports (onnxruntime, cv2, numba)
        pipes[preset], per_photo["_load"][preset] = loaded(preset, warm)
    turn = 0
    for name in args.sets:
        for path in photos(name)[:args.limit]:
            rgb = np.asarray(Image.open(path).convert("RGB"))
            order = args.presets[turn % 2:] + args.presets[:turn % 2]
            turn += 1
            per_photo[f"{name}/{path.stem}"] = {preset: one_photo(pipes[preset], rgb) for preset in order}
        for preset in args.presets:
            got = [v[preset] for k, v in per_photo.items() if k.startswith(f"{name}/")]
            seg = statistics.fmean(g["segment"] for g in got)
            rest = statistics.fmean(g["finish"] for g in got)
            print(f"{name} {preset:9} photos {len(got):3}  load {per_photo['_load'][preset]:5.2f}  "
                  f"segment {seg:5.2f}  finish {rest:5.2f}  total {seg + rest:5.2f} CPU-s per photo", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(per_photo, indent=1))


if __name__ == "__main__":
    main()
