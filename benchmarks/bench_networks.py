"""Per-image cost of each segmentation network on real photos: CPU-seconds (user+sys) and wall.

    python benchmarks/bench_networks.py [--models modnet:512,u2netp:320,isnet-general+modnet]
                                        [--photos 8] [--set grabcut_msrc|alphamatting_lowres]

Model stage only (resize in, forward, resize out), the model loaded first (its load is printed
apart). Photos: the first N of ``$CUTOUT_EVAL_DATA/<set>/image`` (default
``../shared/testdata``); IoU against their hand-made ``mask/`` (boundary band left out) or
``alpha/`` (at 0.5) is printed so a cheap-but-wrong model shows. CPU time counts every thread of this process.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.jobs.settings import settings
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.registry import build_segmenter
from cutout.workers.segment import cpu_threads


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    valid = truth != 128
    a, b = mask[valid] > 0.5, truth[valid] > 128
    return float((a & b).sum() / max(1, (a | b).sum()))


def photos(dataset: str, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    root = Path(settings().eval_data) / dataset
    truths = root / "mask" if (root / "mask").is_dir() else root / "alpha"
    found = []
    for path in sorted((root / "image").iterdir())[:count]:
        truth = np.asarray(Image.open(truths / f"{path.stem}.png").convert("L"))
        found.append((path.stem, np.asarray(Image.open(path).convert("RGB")), truth))
    return found


def measure(model: str, seg_size: int | None, images) -> None:
    cpu, wall = cpu_seconds(), time.perf_counter()
    segmenter = build_segmenter(PipelineOptions(model=model, seg_size=seg_size), device="cpu")
    load_cpu, load_wall = cpu_seconds() - cpu, time.perf_counter() - wall
    segmenter.predict([images[0][1]])  # warm-up: first-run allocations
    cpu_per, wall_per, ious = [], [], []
    for _, rgb, truth in images:
        cpu, wall = cpu_seconds(), time.perf_counter()
        mask = segmenter.predict([rgb])[0]
        cpu_per.append(cpu_seconds() - cpu)
        wall_per.append(time.perf_counter() - wall)
        ious.append(iou(mask, truth))
    print(
        f"{model:28} {str(seg_size or 'default'):>8} {getattr(segmenter, 'runtime', '-'):>12} "
        f"{load_cpu:6.2f} / {load_wall:5.2f}   {np.mean(cpu_per):5.2f} / {np.mean(wall_per):5.2f}   "
        f"{np.median(cpu_per):5.2f} / {np.median(wall_per):5.2f}   {np.mean(ious):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="modnet:512,u2netp:320", help="MODEL[:SIZE],...")
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--set", default="grabcut_msrc", help="a folder of $CUTOUT_EVAL_DATA with image/ and mask/ or alpha/")
    args = parser.parse_args()
    images = photos(args.set, args.photos)
    print(f"{len(images)} photos of {args.set}, cpu threads {cpu_threads()}; seconds are CPU (user+sys) / wall")
    print(f"{'model':28} {'size':>8} {'runtime':>12} {'load cpu/wall':>14}   {'mean/image':>13}   {'median/image':>13}   IoU")
    for item in args.models.split(","):
        model, _, size = item.partition(":")
        measure(model, int(size) if size else None, images)


if __name__ == "__main__":
    main()
