"""Submit and incremental submit of N URIs from a list file: peak RSS, wall, CPU, Redis memory.

Each submit runs in its own process (``--child``), so its peak RSS (VmHWM: ``peak_rss.py``) is
its own, not this script's, with a temp folder of its own whose size is sampled to give the temp
disk the digest runs took at peak (``--ram-run-entries`` lowers the size above which a run goes
to disk). Starts a private redis-server; the destination is a temp folder (file://). Prints one
line per step; no asserts (the target: 10^7 URIs in at most 5 minutes and 1 GB RSS, and at most
``CUTOUT_QUEUE_WINDOW`` shard messages in the broker).

    python benchmarks/bench_submit_memory.py [--count 1000000] [--new 10000] [--window 10000]
        [--ram-run-entries N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from peak_rss import peak_rss_mb  # noqa: E402  (benchmarks/, the script's own folder)


def write_list(path: Path, start: int, stop: int, mode: str = "w") -> None:
    with open(path, mode) as handle:
        for i in range(start, stop):
            handle.write(f"s3://bench-bucket/photos/{i // 1000:05d}/img_{i:09d}.jpg\n")


def child(args) -> None:
    """One submit, in this process: prints its result as JSON."""
    from cutout.jobs import digests
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_incremental, submit_job

    spec = JobSpec(sources=(args.list_file,), destination=args.dest, pipeline=PipelineOptions(model="threshold"),
                   shard_size=args.shard_size)
    if args.ram_run_entries is not None:
        digests.RAM_RUN_ENTRIES = args.ram_run_entries
    submit = submit_incremental if args.incremental else submit_job
    result = submit(spec, broker_url=args.redis, redis_url=args.redis)
    print(json.dumps({"items": result.items_total, "shards": result.shards_total, "sent": result.shards_enqueued,
                      "new": result.items_new, "peak_rss_mb": peak_rss_mb()}))


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed while we looked
                pass
    return total


def sample_peak(folder: Path, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.2):
        peak[0] = max(peak[0], folder_bytes(folder))


def run_child(list_file: Path, dest: str, redis_url: str, *, incremental: bool, shard_size: int | None,
              window: int, ram_run_entries: int | None) -> dict:
    command = [sys.executable, __file__, "--child", "--list-file", str(list_file), "--dest", dest,
               "--redis", redis_url]
    if incremental:
        command.append("--incremental")
    if shard_size:
        command += ["--shard-size", str(shard_size)]
    if ram_run_entries is not None:
        command += ["--ram-run-entries", str(ram_run_entries)]
    temp = list_file.parent / ("tmp-incremental" if incremental else "tmp-first")
    temp.mkdir()
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=sample_peak, args=(temp, stop, peak), daemon=True)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "CUTOUT_QUEUE_WINDOW": str(window), "TMPDIR": str(temp)})
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["temp_peak_mb"] = peak[0] / 2**20
    result["temp_left_mb"] = folder_bytes(temp) / 2**20
    return result


def temp_line(result: dict) -> str:
    return (f"temp disk peak {result['temp_peak_mb']:.1f} MiB (sampled every 0.2 s), "
            f"{result['temp_left_mb']:.1f} MiB left after exit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=10_000, help="inputs added before the incremental submit")
    parser.add_argument("--window", type=int, default=10_000)
    parser.add_argument("--shard-size", type=int, default=None, help="default: the job's automatic size")
    parser.add_argument("--ram-run-entries", type=int, default=None,
                        help="digest runs larger than this go to temp disk (default: cutout.jobs.digests)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--incremental", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--list-file", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from tests.services import RedisServer

    workdir = Path(tempfile.mkdtemp(prefix="cutout-bench-submit-mem-"))
    list_file = workdir / "inputs.txt"
    write_list(list_file, 0, args.count)
    dest = (workdir / "out").as_uri()
    try:
        with RedisServer() as server:
            client = server.client()
            base = client.info("memory")["used_memory"]
            first = run_child(list_file, dest, server.url, incremental=False, shard_size=args.shard_size,
                              window=args.window, ram_run_entries=args.ram_run_entries)
            redis_mb = (client.info("memory")["used_memory"] - base) / 2**20
            queued = client.llen("cutout")
            print(f"submit {args.count:,} URIs: {first['shards']:,} shards, {first['sent']:,} sent now "
                  f"({queued:,} messages in the broker); wall {first['wall_s']:.1f} s, CPU "
                  f"{first['cpu_s']:.1f} s (user+sys), peak RSS {first['peak_rss_mb']:.0f} MB; "
                  f"Redis +{redis_mb:.1f} MiB; {temp_line(first)}")
            write_list(list_file, args.count, args.count + args.new, mode="a")
            second = run_child(list_file, dest, server.url, incremental=True, shard_size=args.shard_size,
                               window=args.window, ram_run_entries=args.ram_run_entries)
            print(f"incremental submit (+{args.new:,} URIs): {second['new']:,} new; wall {second['wall_s']:.1f} s, "
                  f"CPU {second['cpu_s']:.1f} s, peak RSS {second['peak_rss_mb']:.0f} MB; "
                  f"{client.llen('cutout'):,} messages in the broker; {temp_line(second)}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
