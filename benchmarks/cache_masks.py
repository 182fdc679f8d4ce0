"""Cache raw soft masks per (model, input size, photo) for benchmarks/tune_cv.py.

Why: choosing defaults needs dozens of post-processing variants per photo; running the networks
once per size and keeping their masks makes every variant cheap. One folder per model and size,
float16 .npy at the photo's own size, and cost.json with the model's CPU-seconds per photo
(user+sys of this process, all threads) and its load cost.

    .venv/bin/python benchmarks/cache_masks.py --cache .cache/masks \\
        isnet-general:512 isnet-general:640 isnet-general:768 isnet-general:1024 \\
        modnet:384 modnet:512 u2netp:320 isnet-general:768:flip
Folders are named isnet_<size>, modnet_<size>, u2netp_<size>, isnet_<size>f for flipped (what tune_cv.py reads).
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

DATA = Path(settings().eval_data)
SHORT_NAMES = {"isnet-general": "isnet"}


def photos() -> list[tuple[str, Path]]:
    am = sorted((DATA / "alphamatting_lowres" / "image").glob("*.png"))
    gc = sorted((DATA / "grabcut_msrc" / "image").iterdir())
    return [("am", p) for p in am] + [("gc", p) for p in gc]


def cache_model(cache: Path, model: str, size: int, flip: bool = False) -> None:
    """``flip``: the network sees the mirrored photo and its mask is mirrored back (folder
    ``<model>_<size>f``), for test-time flip averaging."""
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.segment import get_segmenter

    folder = cache / f"{SHORT_NAMES.get(model, model)}_{size}{'f' if flip else ''}"
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
        if flip:
            rgb = np.ascontiguousarray(rgb[:, ::-1])
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        mask = segmenter.predict([rgb])[0]
        if flip:
            mask = mask[:, ::-1]
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
        np.save(folder / f"{dataset}_{path.stem}.npy", mask.astype(np.float16))
    stats = {"load_cpu": load_cpu, "cpu_median": statistics.median(cpu),
             "wall_median": statistics.median(wall), "n": len(cpu)}
    (folder / "cost.json").write_text(json.dumps(stats))
    print(model, size, stats, flush=True)


def recost(cache: Path, jobs: list[tuple[str, int]], count: int) -> None:
    """Re-measure every model's CPU cost in one interleaved pass over ``count`` photos, so the
    costs compare (caching ran over an hour of changing machine load)."""
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.segment import get_segmenter

    sample = [np.asarray(Image.open(p).convert("RGB")) for _s, p in photos()[::77 // count][:count]]
    segmenters, cpu = {}, {job: [] for job in jobs}
    for job in jobs:
        start = time.process_time()
        segmenters[job] = get_segmenter(PipelineOptions(model=job[0], seg_size=job[1]), device="cpu")
        segmenters[job].predict(sample[:1])  # first call warms the session
        cpu[job].append(time.process_time() - start)
    for rgb in sample:
        for job in jobs:
            start = time.process_time()
            segmenters[job].predict([rgb])
            cpu[job].append(time.process_time() - start)
    for (model, size), values in cpu.items():
        path = cache / f"{SHORT_NAMES.get(model, model)}_{size}" / "cost.json"
        stats = {**json.loads(path.read_text()), "load_cpu": values[0],
                 "cpu_median": statistics.median(values[1:]), "recost_photos": count}
        path.write_text(json.dumps(stats))
        print(model, size, stats, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=".cache/masks")
    parser.add_argument("--recost", type=int, metavar="N",
                        help="only re-measure the CPU cost of every job, interleaved, on N photos")
    parser.add_argument("jobs", nargs="+", metavar="MODEL:SIZE")
    args = parser.parse_args()
    jobs = [parse_job(job) for job in args.jobs]
    if args.recost:
        recost(Path(args.cache), [(model, size) for model, size, _flip in jobs], args.recost)
        return
    for model, size, flip in jobs:
        cache_model(Path(args.cache), model, size, flip)


def parse_job(job: str) -> tuple[str, int, bool]:
    """``MODEL:SIZE`` or ``MODEL:SIZE:flip``."""
    parts = job.split(":")
    return parts[0], int(parts[1]), parts[2:] == ["flip"]


if __name__ == "__main__":
    main()
