"""One very large photo through the whole pipeline: seconds per stage and peak memory.

Dataset-scale inputs include the odd 40-60 MP camera original; whatever the pipeline does at
full resolution (trimap, foreground colours, compositing) decides the time and memory such an
image costs a worker. A synthetic subject (a disc on a plain backdrop, JPEG) keeps the run
reproducible; the model still sees it at its own input size.

    python benchmarks/bench_large_image.py [--megapixels 48] [--model isnet-general]
"""
from __future__ import annotations

import argparse
import io
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_photo(megapixels: float) -> bytes:
    width = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
    height = int(round(width * 3 / 4))
    image = np.full((height, width, 3), 235, np.uint8)
    yy, xx = np.ogrid[:height, :width]
    radius = height // 3
    image[(yy - height // 2) ** 2 + (xx - width // 2) ** 2 < radius**2] = (30, 60, 160)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=48.0)
    parser.add_argument("--model", default="isnet-general")
    parser.add_argument("--background", default="transparent")
    args = parser.parse_args()

    from cutout import remove_background

    settings = {"model": args.model, "background": args.background,
                "max_pixels": max(64_000_000, int(args.megapixels * 1e6) + 1)}
    data = synthetic_photo(args.megapixels)
    remove_background(synthetic_photo(0.3), **settings)  # loads the model (and its sessions) first
    before = peak_rss_mb()
    start = time.perf_counter()
    result = remove_background(data, **settings)
    seconds = time.perf_counter() - start
    height, width = result.image.shape[:2]
    print(f"{width}x{height} ({width * height / 1e6:.0f} MP), model {args.model}, background {args.background}")
    print(f"total: {seconds:.1f} s; peak RSS {peak_rss_mb():,.0f} MB (after loading the model: {before:,.0f} MB)")
    print("stages: " + "  ".join(f"{name} {value:.2f}" for name, value in result.timings.items()))


if __name__ == "__main__":
    main()
