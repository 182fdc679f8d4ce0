"""Listing an s3:// prefix: one ListObjectsV2 chain against the parallel tree listing.

Starts moto's S3 server behind the fault proxy (``--latency-ms`` per request, like a far-away
object store), fills a bucket with ``--folders`` × ``--per-folder`` keys, and lists the prefix
both ways. Prints requests, wall and CPU seconds per way; no asserts.

    python benchmarks/bench_listing.py [--folders 40] [--per-folder 60] [--latency-ms 50]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=int, default=40)
    parser.add_argument("--per-folder", type=int, default=60)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()

    from tests.faultproxy import FaultProxy
    from tests.services import MotoS3Server

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    with MotoS3Server() as s3:
        os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
        from cutout.jobs import storage

        client = storage.s3_client()
        client.create_bucket(Bucket="bench-listing")
        for folder in range(args.folders):
            for i in range(args.per_folder):
                client.put_object(Bucket="bench-listing", Key=f"in/{folder:04d}/{i:05d}.jpg", Body=b"")
        with FaultProxy(upstream=s3.endpoint, latency_s=args.latency_ms / 1000) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            for name, listing in (("one chain", storage.list_uris), ("tree", storage.list_tree)):
                requests, wall, cpu = proxy.requests_seen, time.perf_counter(), time.process_time()
                keys = sum(1 for _ in listing("s3://bench-listing/in/"))
                print(f"{name:>9}: {keys:,} keys, {proxy.requests_seen - requests:,} requests, "
                      f"wall {time.perf_counter() - wall:.2f} s, CPU {time.process_time() - cpu:.2f} s")


if __name__ == "__main__":
    main()
