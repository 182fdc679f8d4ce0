"""IS-Net speed on CPU: torch vs onnxruntime at several input sizes, and how much they agree.

    python benchmarks/bench_isnet.py [--sizes 1024,896,768,640] [--repeats 3] [--image GT04.png]

Uses the real weights from the models dir (``cutout models fetch isnet-general``) and a real
photo from ``$CUTOUT_EVAL_DATA/alphamatting_lowres/image`` (default ``../shared/testdata``).
Prints median and minimum seconds per image (model stage only: resize in, forward, resize out), the mask
IoU (at 0.5) between the runtimes, and each runtime's IoU against the ground-truth alpha.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.jobs.settings import settings
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.isnet import build_isnet
from cutout.workers.models.registry import get_model_spec
from cutout.workers.segment import cpu_threads


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max(1, (a | b).sum()))


def _seconds_per_image(segmenter, image: np.ndarray, repeats: int) -> tuple[tuple[float, float], np.ndarray]:
    mask = segmenter.predict([image])[0]  # warm-up (allocations, ORT graph init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mask = segmenter.predict([image])[0]
        times.append(time.perf_counter() - start)
    return (statistics.median(times), min(times)), mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,896,768,640")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", default="GT04.png")
    args = parser.parse_args()

    data = Path(settings().eval_data) / "alphamatting_lowres"
    image = np.asarray(Image.open(data / "image" / args.image).convert("RGB"))
    truth = np.asarray(Image.open(data / "alpha" / args.image).convert("L")).astype(np.float32) / 255.0
    spec = get_model_spec("isnet-general")
    print(f"image {args.image} {image.shape[1]}x{image.shape[0]}, cpu threads {cpu_threads()}, repeats {args.repeats}")
    print("seconds per image: median / min (min is the better estimate on a busy machine)")
    print(f"{'size':>5} {'torch s/img':>12} {'ort s/img':>12} {'IoU t/ort':>10} {'IoU gt torch':>13} {'IoU gt ort':>11}")
    for size in (int(s) for s in args.sizes.split(",")):
        options = PipelineOptions(seg_size=size)
        timings, masks = {}, {}
        for runtime in ("torch", "onnxruntime"):
            segmenter = build_isnet(spec, options, "cpu", runtime=runtime)
            timings[runtime], masks[runtime] = _seconds_per_image(segmenter, image, args.repeats)
            del segmenter
        print(
            f"{size:>5} {'%.2f / %.2f' % timings['torch']:>12} {'%.2f / %.2f' % timings['onnxruntime']:>12} "
            f"{_iou(masks['torch'], masks['onnxruntime']):>10.4f} "
            f"{_iou(masks['torch'], truth):>13.4f} {_iou(masks['onnxruntime'], truth):>11.4f}"
        )


if __name__ == "__main__":
    main()
