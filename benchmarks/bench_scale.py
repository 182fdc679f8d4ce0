"""Bookkeeping at scale: a finished job of N inputs built with the project's own writers, then
submit, status, report, the manifest and an incremental submit measured on it.

No Celery worker and no image: submit is the real ``submit_job`` from a list file of N URIs;
each shard then gets its records and stats from the real shard-result writer
(``manifest.write_shard_result`` with ``workers.shard.shard_stats``), its live counters from the
real progress code (``LiveProgress.items_finished`` / ``shard_finished``), and each group's
Parquet part and roll-up from the real builder, called the way a worker calls it
(``manifest_parts.after_shard``; a group's own task body is ``build_and_propagate``, run here
in place of the Celery task). 1 % of inputs fail, 2 % carry a quality flag; timings and quality
values differ per input (so parts compress as real ones would, not better). Before any shard
runs, the list grows by 1 % and an incremental submit adds those inputs.

Every phase runs in its own process, so its peak RSS (VmHWM: ``peak_rss.py``) is its own.
Storage requests are counted by a layer around ``cutout.jobs.storage`` (a listing counts one
request per 1000 names, as an S3 ListObjectsV2 page does) and, with ``--s3``, by boto3
``before-call`` events on the real client (what moto's server answered). Redis is a private redis-server on a free port.

    python benchmarks/bench_scale.py [--sizes 1e5,1e6,1e7] [--s3] [--keep DIR] [--workers 2]

Prints one table (rows: figures, columns: sizes). No asserts; the targets are in
docs/results.md ("Bookkeeping at scale").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from peak_rss import peak_rss_mb  # noqa: E402  (benchmarks/, the script's own folder)

FAILED_EVERY = 100  # 1 % of inputs fail
FLAGGED_EVERY = 50  # 2 % of done outputs carry a quality flag
WORKER = "bench:1"


# --- the list file --------------------------------------------------------------------------------
def write_list(path: Path, start: int, stop: int, mode: str = "w") -> None:
    with open(path, mode) as handle:
        for i in range(start, stop):
            handle.write(f"s3://bench-bucket/photos/{i // 1000:05d}/img_{i:09d}.jpg\n")


# --- counting storage requests --------------------------------------------------------------------
class RequestCounter:
    """Calls into ``cutout.jobs.storage`` (a listing: one per 1000 names) and, on S3, the
    operations boto3 really sent."""

    NAMES = ("read_bytes", "write_bytes", "upload_file", "exists", "delete")
    LISTINGS = ("list_uris", "list_tree")

    def __init__(self):
        self.calls = 0
        self.boto: dict[str, int] = {}

    def boto_total(self) -> int:
        return sum(self.boto.values())

    @contextlib.contextmanager
    def counting(self, s3: bool):
        from cutout.jobs import storage

        originals = {name: getattr(storage, name) for name in self.NAMES + self.LISTINGS}

        def plain(original):
            def call(*args, **kwargs):
                self.calls += 1
                return original(*args, **kwargs)
            return call

        def listing(original):
            def call(*args, **kwargs):
                self.calls += 1
                for n, uri in enumerate(original(*args, **kwargs), start=1):
                    if n % 1000 == 0:
                        self.calls += 1
                    yield uri
            return call

        for name in self.NAMES:
            setattr(storage, name, plain(originals[name]))
        for name in self.LISTINGS:
            setattr(storage, name, listing(originals[name]))
        client = storage.s3_client() if s3 else None
        if client is not None:
            client.meta.events.register("before-call.s3", self._boto_call)
        try:
            yield self
        finally:
            if client is not None:
                client.meta.events.unregister("before-call.s3", self._boto_call)
            for name, original in originals.items():
                setattr(storage, name, original)

    def _boto_call(self, model, **_):
        self.boto[model.name] = self.boto.get(model.name, 0) + 1

    def requests(self, s3: bool) -> int:
        return self.boto_total() if s3 else self.calls


# --- phases (each in its own process) -------------------------------------------------------------
def phase_submit(args) -> dict:
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_incremental, submit_job

    spec = JobSpec(sources=(args.list_file,), destination=args.dest, pipeline=PipelineOptions(model="threshold"))
    submit = submit_incremental if args.phase == "incremental" else submit_job
    result = submit(spec, broker_url=args.redis, redis_url=args.redis)
    return {"job_id": result.job_id, "items": result.items_total, "shards": result.shards_total,
            "sent": result.shards_enqueued, "new": result.items_new}


def phase_finish(args) -> dict:
    """Every shard finished by the real writers, groups built as they complete; then the last
    shard alone, timed from its write to a manifest that pyarrow.dataset reads whole."""
    from multiprocessing import get_context

    from cutout.jobs import manifest, manifest_parts
    from cutout.jobs.sharding import job_prefix, shard_id_for

    prefix = job_prefix(args.dest, args.job)
    _items, shards = manifest.load_totals(prefix)
    per_group = manifest_parts.group_shards(prefix)
    last = shards - 1
    groups = -(-shards // per_group)
    chunks = [(g * per_group, min((g + 1) * per_group, last)) for g in range(groups)]
    if args.last_group_only:  # a size too big to finish here: the last group is what the clock needs
        chunks = chunks[-1:]
    with get_context("fork").Pool(args.workers) as pool:
        pool.starmap(_finish_range, [(args.dest, args.job, args.redis, a, b) for a, b in chunks if a < b])
    started = time.perf_counter()
    shard_written = _finish_range(args.dest, args.job, args.redis, last, last + 1)
    rows = _dataset(prefix).count_rows()
    queryable = time.perf_counter()
    distinct = _distinct_inputs(_dataset(prefix))
    parts = sorted(Path(_local(prefix)).glob("manifest/*.parquet")) if prefix.startswith("file:") else []
    return {"last_shard_s": shard_written - started, "queryable_s": queryable - shard_written,  # its group built
            "rows": rows, "distinct_inputs": distinct, "groups": groups, "per_group": per_group,
            "last_shard": shard_id_for(last), "part_bytes": [p.stat().st_size for p in parts]}


def _finish_range(dest: str, job_id: str, redis_url: str, first: int, stop: int) -> float:
    """Finish shards [first, stop); returns when the last one's done-marker and counters were
    written (before its group is built)."""
    import redis

    from cutout.jobs import manifest, manifest_parts
    from cutout.jobs.progress import LiveProgress
    from cutout.jobs.sharding import job_prefix, read_shard, shard_id_for
    from cutout.workers.shard import load_spec_cached, shard_stats

    prefix = job_prefix(dest, job_id)
    spec = load_spec_cached(prefix)
    progress = LiveProgress(redis.Redis.from_url(redis_url), job_id)

    def send(job_prefix_: str, group: int) -> None:  # the group task's body, without Celery
        manifest_parts.build_and_propagate(job_prefix_, group, send)

    for index in range(first, stop):
        shard_id = shard_id_for(index)
        shard = read_shard(prefix, shard_id)
        started = time.time()
        progress.shard_started(shard_id, WORKER)
        records = [_record(spec, shard_id, item) for item in shard.items]
        progress.items_finished(shard_id, records)
        stats = shard_stats(spec, shard_id, records, started, WORKER, 1)
        manifest.write_shard_result(prefix, shard_id, records, stats)
        progress.shard_finished(shard_id, records)
        written = time.perf_counter()
        manifest_parts.after_shard(prefix, shard_id, progress, send)
    return written


def _record(spec, shard_id: str, item):
    from cutout.jobs.records import ItemRecord

    number = int(item.uri[-13:-4])
    common = {"input_uri": item.uri, "model": spec.pipeline.model, "config_hash": spec.pipeline.config_hash(),
              "shard_id": shard_id, "worker": WORKER, "job_id": spec.job_id}
    if number % FAILED_EVERY == FAILED_EVERY - 1:
        return ItemRecord(status="failed", stage="decode", error_class="DecodeError",
                          error="cannot identify image file", timings={"read": 0.012}, **common)
    flags = ["low_confidence"] if number % FLAGGED_EVERY == 0 else []
    spread = [((number * prime) % 9973) / 9973 for prime in (7919, 104729, 1299709)]  # values differ per input
    return ItemRecord(status="done", output_uris=[item.output_uri], width=640 + number % 3000,
                      height=480 + number % 2000, flags=flags,
                      timings={"read": 0.01 * spread[0], "decode": 0.02 + 0.01 * spread[1], "segment": 0.4 * spread[2],
                               "composite": 0.03 * spread[1], "write": 0.015 * spread[0]},
                      quality={"alpha_coverage": spread[0], "unknown_share": spread[1] / 10, "confidence": spread[2]},
                      **common)


def _dataset(prefix: str):
    """The manifest as one dataset: pyarrow.dataset over the parts folder."""
    import pyarrow.dataset as ds

    folder = prefix + "/manifest/"
    if folder.startswith("file:"):
        return ds.dataset(_local(folder), format="parquet")
    import pyarrow.fs as pafs

    bucket_key = folder[len("s3://"):]
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme=endpoint.split(":")[0],
                           access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                           region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return ds.dataset(bucket_key, format="parquet", filesystem=fs)


def _distinct_inputs(dataset) -> int:
    """Inputs named in the manifest, each counted once (equal to its rows: every input once)."""
    import pyarrow.compute as pc

    return pc.count_distinct(dataset.to_table(columns=["input_uri"])["input_uri"]).as_py()


def _local(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(uri).path)


def phase_command(args) -> dict:
    """One `cutout status` or `cutout report` in this process, its storage requests counted."""
    from cutout.jobs.cli import main

    argv = [args.phase, args.job, "--dest", args.dest, "--redis", args.redis, "--broker", args.redis]
    counter = RequestCounter()
    out = io.StringIO()
    with counter.counting(args.s3), contextlib.redirect_stdout(out):
        started = time.perf_counter()
        code = main(argv)
        wall = time.perf_counter() - started
    return {"wall_s": wall, "requests": counter.requests(args.s3), "storage_calls": counter.calls,
            "boto": counter.boto, "exit": code, "first_line": out.getvalue().splitlines()[0]}


PHASES = {"submit": phase_submit, "incremental": phase_submit, "finish": phase_finish,
          "status": phase_command, "report": phase_command}


def child(args) -> None:
    result = PHASES[args.phase](args)
    result["peak_rss_mb"] = peak_rss_mb()  # its own, not the peak of the script that started it
    print(json.dumps(result))


def run_phase(phase: str, ctx: dict, **extra) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--dest", ctx["dest"], "--redis", ctx["redis"],
               "--list-file", str(ctx["list_file"]), "--job", ctx.get("job", ""), "--workers", str(ctx["workers"])]
    for flag in ("s3", "last_group_only"):
        if ctx[flag]:
            command.append("--" + flag.replace("_", "-"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=ctx["env"])
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"# {phase}: {json.dumps(result)}", file=sys.stderr, flush=True)  # a long run shows each phase
    return result


# --- one size ---------------------------------------------------------------------------------------
def measure(size: int, workdir: Path, *, s3_endpoint: str | None, workers: int, last_group_only: bool) -> dict:
    from tests.services import RedisServer

    workdir.mkdir(parents=True, exist_ok=True)
    list_file = workdir / "inputs.txt"
    write_list(list_file, 0, size)
    env = {**os.environ, "CUTOUT_MANIFEST_INLINE_SHARDS": "0"}  # every group through its task body
    if s3_endpoint:
        from tests.services import S3_TEST_ENV

        env.update(S3_TEST_ENV, AWS_ENDPOINT_URL=s3_endpoint)
        bucket = f"bench-scale-{uuid.uuid4().hex[:8]}"
        _make_bucket(bucket, env)
        dest = f"s3://{bucket}/out"
    else:
        dest = (workdir / "out").as_uri()
    out: dict = {"size": size, "where": "s3 (moto)" if s3_endpoint else "local"}
    with RedisServer() as server:
        client = server.client()
        ctx = {"dest": dest, "redis": server.url, "list_file": list_file, "s3": bool(s3_endpoint), "env": env,
               "workers": workers, "last_group_only": last_group_only}
        base = client.info("memory")["used_memory"]
        out["submit"] = run_phase("submit", ctx)
        ctx["job"] = out["submit"]["job_id"]
        out["redis_submit_mib"] = (client.info("memory")["used_memory"] - base) / 2**20
        out["broker_messages"] = client.llen("cutout")
        print(f"# Redis after submit: +{out['redis_submit_mib']:.1f} MiB, {out['broker_messages']:,} messages",
              file=sys.stderr, flush=True)
        # the source grows by 1 % before any shard ran: compared against all N inputs
        write_list(list_file, size, size + max(1000, size // 100), mode="a")
        out["incremental"] = run_phase("incremental", ctx)
        out["finish"] = run_phase("finish", ctx)
        out["redis_finished_mib"] = (client.info("memory")["used_memory"] - base) / 2**20
        if last_group_only:
            return out
        out["status_up"] = run_phase("status", ctx)
        out["report"] = run_phase("report", ctx)
        client.flushall()
        out["status_lost"] = run_phase("status", ctx)
    return out


def _make_bucket(bucket: str, env: dict) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)


# --- the table ----------------------------------------------------------------------------------------
def rows_of(m: dict) -> list[tuple[str, str]]:
    sub, fin, inc = m["submit"], m["finish"], m["incremental"]
    parts = fin["part_bytes"]
    part_text = (f"{fin['groups']} × ≤{fin['per_group']} shards, largest {max(parts) / 2**20:.2f} MiB, "
                 f"{sum(parts) / fin['rows']:.0f} B/row" if parts else f"{fin['groups']} × ≤{fin['per_group']} shards")
    return [
        ("inputs / shards / sent at submit", f"{sub['items']:,} / {sub['shards']:,} / {sub['sent']:,}"),
        ("submit wall / CPU / peak RSS", _run(sub)),
        ("Redis after submit / broker messages", f"+{m['redis_submit_mib']:.1f} MiB / {m['broker_messages']:,}"),
        ("Redis after every shard counted", f"+{m['redis_finished_mib']:.1f} MiB"),
        ("manifest parts", part_text),
        ("last shard → queryable manifest", f"{fin['queryable_s']:.2f} s ({fin['rows']:,} rows, "
                                            f"{fin.get('distinct_inputs', 0):,} inputs)"),
        ("status, Redis up: wall / requests", _cmd(m.get("status_up"))),
        ("status, Redis lost: wall / requests", _cmd(m.get("status_lost"))),
        ("report (text): wall / requests", _cmd(m.get("report"))),
        (f"incremental (+{inc['new']:,}) wall / CPU / peak RSS", _run(inc)),
    ]


def _run(r: dict) -> str:
    return f"{r['process_wall_s']:.1f} s / {r['cpu_s']:.1f} s / {r['peak_rss_mb']:.0f} MB"


def _cmd(r: dict | None) -> str:
    if r is None:
        return "(not run)"
    return f"{r['wall_s']:.2f} s / {r['requests']:,}"


def print_table(results: list[dict]) -> None:
    headers = [f"{m['size']:.0e} {m['where']}".replace("e+0", "e") for m in results]
    table = [rows_of(m) for m in results]
    print("| | " + " | ".join(headers) + " |")
    print("|---|" + "---|" * len(headers))
    for i, (name, _) in enumerate(table[0]):
        print(f"| {name} | " + " | ".join(rows[i][1] for rows in table) + " |")
    for m in results:
        if "status_up" not in m:
            continue
        checks = (f"status up {m['status_up']['first_line']!r} exit {m['status_up']['exit']}; "
                  f"status lost exit {m['status_lost']['exit']}; report {m['report']['first_line']!r}")
        print(f"{m['size']:,} {m['where']}: {checks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="comma-separated input counts (1e5 or 100000)")
    parser.add_argument("--s3", action="store_true", help="also run the smallest size on moto's S3 server")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep the jobs under DIR (default: a temp folder, removed)")
    parser.add_argument("--workers", type=int, default=2, help="processes that finish shards (not timed)")
    parser.add_argument("--last-group-only", action="store_true",
                        help="finish only the last group's shards (a size this machine cannot finish): "
                             "submit, incremental and last shard → queryable part; no status or report")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the raw figures as JSON")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    for hidden in ("--dest", "--redis", "--list-file", "--job"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return child(args)

    sizes = [int(float(s)) for s in args.sizes.split(",")]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cutout-bench-scale-"))
    results = []
    try:
        for size in sizes:
            results.append(measure(size, root / f"local-{size}", s3_endpoint=None, workers=args.workers,
                                   last_group_only=args.last_group_only))
            print(f"# {size:,} local done", file=sys.stderr, flush=True)
        if args.s3:
            from tests.services import MotoS3Server

            with MotoS3Server() as moto:
                results.append(measure(min(sizes), root / f"s3-{min(sizes)}", s3_endpoint=moto.endpoint,
                                       workers=args.workers, last_group_only=args.last_group_only))
        print_table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
