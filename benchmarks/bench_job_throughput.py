"""Queue and storage overhead: a 200-image job on 2 workers vs ``cutout run`` on the same images.

Starts its own redis-server and then one, then two ``cutout worker`` processes (solo pool, the
CPU cores split between them). One worker against ``cutout run`` is the pure queue + storage overhead; two
workers show what the fleet gains on this machine's two cores. The job goes
file:// → file:// (add ``--s3`` to go bucket → bucket through a local moto server instead).
Workers are started and warmed up before the clock starts (a fleet is long-lived); each side
loads its model once. Prints both wall times and the overhead %; no asserts (goal ≤ 10 %).

    python benchmarks/bench_job_throughput.py [--images 200] [--model threshold] [--matting closed-form]
        [--workers 1,2] [--s3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.services import S3_TEST_ENV, MotoS3Server, RedisServer  # noqa: E402


def make_images(folder: Path, count: int, side: int) -> None:
    import skimage.data

    photos = [getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = Image.fromarray(photo[top : top + 3 * h // 4, left : left + 3 * w // 4])
        crop = crop.resize((side, int(side * crop.height / crop.width)))
        path = folder / f"batch{i // 50}" / f"img_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, quality=92)


def run_local(inputs: Path, out: Path, args) -> float:
    """Seconds `cutout run` reports for the images, after its model is loaded (as the workers')."""
    import re

    command = [sys.executable, "-m", "cutout.jobs.cli", "run", str(inputs), "--out", str(out), "--no-progress",
               "--model", args.model, "--matting", args.matting, "--device", "cpu"]
    done = subprocess.run(command, cwd=REPO_ROOT, check=False, capture_output=True, text=True)
    match = re.search(r"of \d+ in ([0-9.]+) s", done.stdout)
    if not match:
        raise RuntimeError(f"cutout run failed:\n{done.stdout}\n{done.stderr}")
    return float(match.group(1))


def start_workers(env: dict, count: int, log_dir: Path) -> list[subprocess.Popen]:
    """``count`` workers sharing the machine's cores (as `cutout worker` would plan them)."""
    threads = str(max(1, (os.cpu_count() or 1) // count))
    env = {**env, "CUTOUT_THREADS": threads, "OMP_NUM_THREADS": threads}
    procs = []
    for i in range(count):
        log = open(log_dir / f"worker-{i}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cutout.jobs.cli", "worker", "--pool", "solo", "--hostname", f"bench{i}@%h",
             "--loglevel", "WARNING"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
    return procs


def wait_done(prefix: str, total: int, timeout: float = 1800) -> None:
    from cutout.jobs import manifest

    deadline = time.monotonic() + timeout
    while len(manifest.done_shard_ids(prefix)) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job not done after {timeout} s")
        time.sleep(0.2)


def run_job(source: str, dest: str, redis_url: str, args, shard_size: int) -> tuple[float, int]:
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_job

    spec = JobSpec(sources=(source,), destination=dest, shard_size=shard_size,
                   pipeline=PipelineOptions(model=args.model, matting=args.matting))
    start = time.perf_counter()
    result = submit_job(spec, broker_url=redis_url, redis_url=redis_url)
    wait_done(result.job_prefix, result.shards_total)
    return time.perf_counter() - start, result.items_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--side", type=int, default=320)
    parser.add_argument("--model", default="threshold")
    parser.add_argument("--matting", default="closed-form")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each side (shared machines are noisy)")
    parser.add_argument("--s3", action="store_true", help="bucket to bucket through a local moto server")
    parser.add_argument("--workers", default="1,2", help="worker counts to time, comma-separated")
    parser.add_argument("--s3-latency-ms", type=float, default=0.0,
                        help="with --s3: delay every worker request to S3 by this much (a far-away store)")
    args = parser.parse_args()
    os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO_ROOT / ".cache" / "numba"))

    work = Path(tempfile.mkdtemp(prefix="cutout-bench-job-"))
    inputs = work / "in"
    make_images(inputs, args.images, args.side)
    # model loaded before its clock starts, like the warmed-up workers; best of N
    local_s = min(run_local(inputs, work / f"local-out{i}", args) for i in range(args.repeats))

    services = [RedisServer().start()]
    env = {**os.environ, "CUTOUT_BROKER_URL": services[0].url, "CUTOUT_REDIS_URL": services[0].url}
    source, dest = inputs.as_uri() + "/", (work / "job-out").as_uri()
    if args.s3:
        os.environ.update(S3_TEST_ENV)
        moto = MotoS3Server().start()
        services.append(moto)
        os.environ["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"] = moto.endpoint
        env.update(S3_TEST_ENV)
        from cutout.jobs.storage import s3_client

        if args.s3_latency_ms:
            from tests.faultproxy import FaultProxy

            proxy = FaultProxy(moto.endpoint, latency_s=args.s3_latency_ms / 1000).start()
            services.append(proxy)
            env["AWS_ENDPOINT_URL"] = proxy.url  # the workers' requests only; uploads here stay fast
        for name in ("bench-in", "bench-out", "bench-warm"):
            s3_client().create_bucket(Bucket=name)
        for path in sorted(inputs.rglob("*.jpg")):
            s3_client().put_object(Bucket="bench-in", Key=str(path.relative_to(inputs)), Body=path.read_bytes())
        source, dest = "s3://bench-in/", "s3://bench-out/out"
    timings: dict[int, float] = {}
    try:
        for count in (int(n) for n in args.workers.split(",")):
            workers = start_workers(env, count, work)
            try:
                warm_dir = work / f"warm{count}"
                make_images(warm_dir, 2 * count, args.side)
                # every worker loads its model before the clock starts (a fleet is long-lived)
                run_job(warm_dir.as_uri() + "/", (work / f"warm-out{count}").as_uri(), services[0].url, args, 1)
                runs = [run_job(source, f"{dest}-{count}w{i}", services[0].url, args, args.shard_size)
                        for i in range(args.repeats)]
                timings[count], items = min(runs)
            finally:
                for proc in workers:
                    proc.terminate()
                for proc in workers:
                    proc.wait(timeout=30)
    finally:
        for service in services:
            service.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"images: {items} ({args.side}px wide), model {args.model}, matting {args.matting}, "
          f"storage {'s3 (moto)' if args.s3 else 'file://'}"
          f"{f' +{args.s3_latency_ms:g} ms per request' if args.s3_latency_ms else ''}, shard size {args.shard_size}")
    print(f"cutout run (1 process):       {local_s:7.1f} s  {items / local_s:6.2f} img/s")
    for count, job_s in timings.items():
        print(f"job, {count} worker{'s' if count > 1 else ' '} (submit→done): {job_s:7.1f} s  {items / job_s:6.2f} img/s  "
              f"({100 * (job_s - local_s) / local_s:+.1f} % vs cutout run)")


if __name__ == "__main__":
    main()
