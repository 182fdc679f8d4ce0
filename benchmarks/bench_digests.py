"""One DigestSet filled the way submit fills it: peak RSS, CPU, wall and the temp disk its runs take.

Why: submit's memory at 10^8 inputs is the digest set's; a real submit of 10^8 takes hours,
the set alone minutes. Adds N random 64-bit digests in batches of 4,096, each batch checked
first (``contains_many``) as submit checks a batch of inputs. Runs of more than
``cutout.jobs.digests.RAM_RUN_ENTRIES`` go to a private temp folder, sampled every 0.2 s for
its size. Prints figures, asserts nothing.

    python benchmarks/bench_digests.py [--count 10000000] [--ram-run-entries N]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_submit_memory import folder_bytes, sample_peak  # noqa: E402

from cutout.jobs import digests  # noqa: E402

BATCH = 4096


def fill(count: int) -> tuple[digests.DigestSet, int]:
    """The set, and how many checked digests were already in it (random: about none)."""
    rng = np.random.default_rng(1)
    digest_set, hits = digests.DigestSet(), 0
    for start in range(0, count, BATCH):
        batch = rng.integers(0, 2**63, min(BATCH, count - start), dtype=np.uint64).tolist()
        hits += sum(digest_set.contains_many(batch))
        for value in batch:
            digest_set.add(value)
        digest_set.settle()
    return digest_set, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000_000)
    parser.add_argument("--ram-run-entries", type=int, default=None)
    args = parser.parse_args()
    if args.ram_run_entries is not None:
        digests.RAM_RUN_ENTRIES = args.ram_run_entries
    temp = Path(tempfile.mkdtemp(prefix="cutout-bench-digests-"))
    tempfile.tempdir = str(temp)
    peak, stop = [0], threading.Event()
    sampler = threading.Thread(target=sample_peak, args=(temp, stop, peak), daemon=True)
    sampler.start()
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu_start = time.perf_counter(), os.times()
    try:
        digest_set, hits = fill(args.count)
        wall, cpu_end = time.perf_counter() - start, os.times()
        cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], folder_bytes(temp))
        runs = [(len(run), "disk" if digests._on_disk(run) else "RAM")
                for run in digest_set._runs]
        print(f"{args.count:,} digests (runs over {digests.RAM_RUN_ENTRIES:,} entries on disk): wall {wall:.1f} s, "
              f"CPU {cpu:.1f} s (user+sys), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
              f"(after imports {start_rss:.0f} MB); in memory {digest_set.nbytes / 2**20:.1f} MiB, on disk "
              f"{digest_set.disk_bytes / 2**20:.1f} MiB, temp disk peak {peak[0] / 2**20:.1f} MiB; "
              f"{hits} found again; runs {runs}")
        digest_set.close()
        print(f"after close: {folder_bytes(temp)} bytes left in the temp folder")
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
