"""Regenerate docs/report-page.png: a real small job, its report page, a headless-Chromium screenshot.

The job is real: scikit-image's sample photos plus two broken files, cut into shards and run by
the same plain shard function a worker runs (no Celery needed), with the default model. Then
``cutout.jobs.report_html`` writes the page and Chromium (``apt-get install chromium``) shoots it.

    .venv/bin/python infra/report_screenshot.py [--out docs/report-page.png] [--model isnet-general]
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "camera", "immunohistochemistry")


def write_inputs(folder: Path) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.dstack([array] * 3)
        image = Image.fromarray(array[..., :3])
        image.thumbnail((480, 480))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{name}.jpg").write_bytes(buffer.getvalue())
    (folder / "truncated.jpg").write_bytes((folder / "coffee.jpg").read_bytes()[:900])
    (folder / "not_an_image.png").write_bytes(b"<html>404 not found</html>")


def run_job(source: Path, dest: Path, model: str) -> tuple[str, str]:
    from cutout.jobs import manifest, manifest_parts, sharding
    from cutout.jobs.sources import iter_source_items
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.workers.shard import process_shard

    spec = JobSpec(sources=(str(source),), destination=str(dest), shard_size=2,
                   pipeline=PipelineOptions(model=model))
    prefix = sharding.job_prefix(str(dest), spec.job_id)
    manifest.save_spec(prefix, spec)
    shards = list(sharding.iter_shards(iter_source_items(spec.sources), destination=str(dest),
                                       extension=spec.pipeline.extension, shard_size=spec.shard_size))
    for shard in shards:
        sharding.write_shard(prefix, shard)
    manifest.save_totals(prefix, sum(len(s.items) for s in shards), len(shards))
    os.environ["CUTOUT_ALLOWED_SOURCES"] = source.resolve().as_uri() + "/"  # this worker may read them
    for shard in shards:
        started = time.time()
        process_shard(prefix, shard.shard_id)
        print(f"  shard {shard.shard_id}: {time.time() - started:.1f} s", file=sys.stderr)
    manifest_parts.build_missing(prefix)  # what the workers' group tasks do
    return prefix, spec.job_id


def screenshot(page: Path, out: Path, size: str = "1280,1900") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium not found: apt-get install -y chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", f"--window-size={size}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(out) as shot:  # 256 colours: about a third of the bytes, fine for a README
        small = shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                             dither=Image.Dither.NONE)
    small.save(out, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/report-page.png")
    parser.add_argument("--model", default="isnet-general")
    parser.add_argument("--work", default=None, help="keep the job here (a rerun skips done shards)")
    parser.add_argument("--window-size", default="1280,1580")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cutout-report-") as temp:
        make_page(Path(args.work or temp), args.model, Path(args.out).resolve(), args.window_size)
    print(args.out)
    return 0


def make_page(work: Path, model: str, out: Path, window_size: str) -> None:
    from cutout.jobs.report_html import write_report

    source, dest = work / "photos", work / "out"
    write_inputs(source)
    prefix, job_id = run_job(source, dest, model)
    page = work / "report.html"
    write_report(prefix, job_id, local_path=str(page), to_destination=False)
    screenshot(page, out, window_size)


if __name__ == "__main__":
    sys.exit(main())
