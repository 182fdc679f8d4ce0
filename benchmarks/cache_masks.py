"""Cache raw soft masks per (model, input size, photo) for benchmarks/tune_cv.py.

Why: choosing defaults needs dozens of post-processing variants per photo; running the networks
once per size and keeping their masks makes every variant cheap. One folder per model and size,
float16 .npy at the photo's own size, and cost.json with the model's CPU-seconds per photo
(user+sys of this process, all threads) and its load cost.

    .venv/bin/python benchmarks/cache_masks.py --cache .cache/masks \\
        isnet-general:512 isnet-general:640 isnet-general:768 isnet-general:1024 \\
        modnet:384 modnet:512 u2netp:320
Folders are named isnet_<size>, modnet_<size>, u2netp_<size> (what tune_cv.py reads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(os.environ.get("CUTOUT_EVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "testdata"))
SHORT_NAMES = {"isnet-general": "isnet"}


def photos() -> list[tuple[str, Path]]:
    am = sorted((DATA / "alphamatting_lowres" / "image").glob("*.png"))
    gc = sorted((DATA / "grabcut_msrc" / "image").iterdir())
    return [("am", p) for p in am] + [("gc", p) for p in gc]


def cache_model(cache: Path, model: str, size: int) -> None:
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.segment import get_segmenter

    folder = cache / f"{SHORT_NAMES.get(model, model)}_{size}"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(s, p) for s, p in photos() if not (folder / f"{s}_{p.stem}.npy").exists()]
    if not todo:
        return
    start = time.process_time()
    segmenter = get_segmenter(PipelineOptions(model=model, seg_size=size), device="cpu")
    load_cpu = time.process_time() - start
    cpu, wall = [], []
    for dataset, path in todo:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        mask = segmenter.predict([rgb])[0]
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
        np.save(folder / f"{dataset}_{path.stem}.npy", mask.astype(np.float16))
    stats = {"load_cpu": load_cpu, "cpu_median": statistics.median(cpu),
             "wall_median": statistics.median(wall), "n": len(cpu)}
    (folder / "cost.json").write_text(json.dumps(stats))
    print(model, size, stats, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=".cache/masks")
    parser.add_argument("jobs", nargs="+", metavar="MODEL:SIZE")
    args = parser.parse_args()
    for job in args.jobs:
        model, size = job.rsplit(":", 1)
        cache_model(Path(args.cache), model, int(size))


if __name__ == "__main__":
    main()
