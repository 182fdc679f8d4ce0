"""Submitter at scale: list and enqueue 1,000,000 URIs (a generated list file) into a local Redis.

Starts its own redis-server on a free port; the destination is a temp folder (file://).
Prints wall time, messages enqueued and peak RSS. No asserts: the goal is < 2 min, < 300 MB.

    python benchmarks/bench_submitter.py [--count 1000000] [--shard-size 32]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.services import RedisServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="cutout-bench-submit-"))
    list_file = workdir / "inputs.txt"
    with open(list_file, "w") as handle:
        for i in range(args.count):
            handle.write(f"s3://bench-bucket/photos/{i // 1000:04d}/img_{i:07d}.jpg\n")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_job

    with RedisServer() as redis_server:
        spec = JobSpec(sources=(str(list_file),), destination=(workdir / "out").as_uri(),
                       pipeline=PipelineOptions(model="threshold"), shard_size=args.shard_size)
        start = time.perf_counter()
        result = submit_job(spec, broker_url=redis_server.url, redis_url=redis_server.url)
        seconds = time.perf_counter() - start
        queued = redis_server.client().llen("cutout")
        start = time.perf_counter()
        again = submit_job(spec, broker_url=redis_server.url, redis_url=redis_server.url)
        resubmit_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"inputs:            {result.items_total:,} in {result.shards_total:,} shards of {args.shard_size}")
    print(f"submit wall time:  {seconds:.1f} s ({result.items_total / seconds:,.0f} URIs/s)")
    print(f"messages in queue: {queued:,}")
    print(f"peak RSS:          {peak:.0f} MB (python + imports before submit: {rss_before:.0f} MB)")
    print(f"resubmit:          {resubmit_s:.1f} s, {again.shards_enqueued:,} shards re-enqueued "
          "(the job is still queued: its messages are in the broker, none is sent twice)")


if __name__ == "__main__":
    main()
