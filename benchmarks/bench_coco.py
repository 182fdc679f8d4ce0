"""A COCO file of N objects as a source: wall, CPU-seconds and peak RSS of iterating its items,
streamed (cutout.jobs.coco) against loading it whole with json.load (the earlier reader).

    nice .venv/bin/python benchmarks/bench_coco.py --count 1000000
    nice .venv/bin/python benchmarks/bench_coco.py --count 10000000 --no-load

The synthetic file has N annotations over N/7 images, in shuffled order (each image's objects
scattered through the file), each with a bbox and an 8-number polygon. Each reader runs in its
own process, so each peak RSS is its own (the process's VmHWM: ru_maxrss would not do, as a child
started by vfork and exec inherits the parent's peak, here the writer's 10^7 shuffled ids).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections import defaultdict

from peak_rss import peak_rss_mb  # this process's own peak: see that module


def write_file(path: str, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    images = max(1, count // 7)
    owners = array("q", (n % images for n in range(count)))  # 8 bytes per object, not a Python int each
    rng.shuffle(owners)
    with open(path, "w") as out:
        out.write('{"info": {"description": "synthetic"}, "images": [')
        for i in range(images):
            out.write(("," if i else "") + json.dumps({"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480}))
        out.write('], "annotations": [')
        for n, image_id in enumerate(owners):
            x, y = round(rng.uniform(0, 500), 2), round(rng.uniform(0, 400), 2)
            out.write(("," if n else "") + json.dumps({
                "id": n, "image_id": image_id, "category_id": rng.randrange(1, 81), "iscrowd": 0, "area": 1234.5,
                "bbox": [x, y, 40.5, 30.25], "segmentation": [[x, y, x + 40, y, x + 40, y + 30, x, y + 30]]}))
        out.write('], "categories": [' + ",".join(json.dumps({"id": c, "name": f"class{c}"}) for c in range(1, 81)) + "]}")


def streamed(path: str) -> int:
    from cutout.jobs.coco import iter_coco_items

    return sum(1 for _ in iter_coco_items(path, "s3://bucket/images/"))


def loaded(path: str) -> int:
    """The earlier reader: json.load, annotations grouped in a dict by image, items built alike."""
    from cutout.jobs.boxes import parse_box
    from cutout.jobs.storage import join_uri

    with open(path, "rb") as handle:
        data = json.load(handle)
    categories = {c["id"]: c["name"] for c in data["categories"]}
    by_image = defaultdict(list)
    for annotation in data["annotations"]:
        if not annotation.get("iscrowd"):
            by_image[annotation["image_id"]].append(annotation)
    count = 0
    for image in data["images"]:
        uri = join_uri("s3://bucket/images/", image["file_name"])
        for index, annotation in enumerate(by_image.get(image["id"], [])):
            extra = {"box": list(parse_box(annotation["bbox"]).values), "box_index": index, "image_uri": uri,
                     "label": categories.get(annotation["category_id"], "")}
            count += bool(extra)
    return count


def measure(reader: str, path: str) -> None:
    wall, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    count = {"stream": streamed, "load": loaded}[reader](path)
    end = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"reader": reader, "items": count, "wall_s": round(time.perf_counter() - wall, 1),
                      "cpu_s": round(end.ru_utime + end.ru_stime - usage.ru_utime - usage.ru_stime, 1),
                      "peak_rss_mb": round(peak_rss_mb())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="annotations in the synthetic file")
    parser.add_argument("--no-load", action="store_true", help="skip json.load (it needs ~1.2 GB per 10^6 objects)")
    parser.add_argument("--measure", nargs=2, metavar=("READER", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    with tempfile.TemporaryDirectory(prefix="bench-coco-") as folder:
        path = os.path.join(folder, "instances.json")
        started = time.perf_counter()
        write_file(path, args.count)
        print(f"{args.count:,} annotations, {max(1, args.count // 7):,} images, shuffled: "
              f"{os.path.getsize(path) / 1e6:,.0f} MB of JSON (written in {time.perf_counter() - started:.0f} s)")
        for reader in ["stream"] + ([] if args.no_load else ["load"]):
            subprocess.run([sys.executable, __file__, "--measure", reader, path], check=True)


if __name__ == "__main__":
    main()
