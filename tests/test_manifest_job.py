"""A job's manifest, status and report at work, on real services: redis-server and a real
``cutout worker`` that writes each group's Parquet part in its own Celery task (inline building
is switched off here). Storage requests are counted by a layer around ``cutout.jobs.storage``:
`status` with Redis up reads no file of the job, after FLUSHALL it reads the roll-ups, and
`report` reads no record; a retry rewrites only its group's part."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services import LOCAL_TEST_SOURCES
from tests.test_job_integration import REPO_ROOT, WORKER_ENV, WorkerFleet, generated_objects, pipeline_options

pytestmark = pytest.mark.integration

SHARD_SIZE, GROUP_SHARDS = 2, 2


@pytest.fixture(scope="module")
def worker(redis_server, tmp_path_factory):
    env = {**os.environ, **WORKER_ENV, **LOCAL_TEST_SOURCES, "CUTOUT_BROKER_URL": redis_server.url,
           "CUTOUT_REDIS_URL": redis_server.url, "CUTOUT_MANIFEST_INLINE_SHARDS": "0"}
    fleet = WorkerFleet(env, tmp_path_factory.mktemp("worker-logs"))
    fleet.ensure(1)
    yield fleet
    fleet.stop()


@contextlib.contextmanager
def counted_requests():
    """Every call into the storage layer (one request each), with the URI it names."""
    from cutout.jobs import storage

    calls: list[tuple[str, str]] = []
    names = ("read_bytes", "write_bytes", "upload_file", "exists", "delete", "list_uris")
    originals = {name: getattr(storage, name) for name in names}

    def counting(name):
        def call(uri, *args, **kwargs):
            calls.append((name, str(uri)))
            return originals[name](uri, *args, **kwargs)
        return call

    for name in names:
        setattr(storage, name, counting(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(storage, name, original)


def _per_shard(calls) -> list:
    return [c for c in calls if "/records/" in c[1] or ("/stats/" in c[1] and c[0] != "list_uris")]


def _cli_in_process(*argv: str) -> tuple[int, str]:
    from cutout.jobs.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutout.jobs.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _wait(check, what: str, fleet, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what}\n{fleet.all_logs()}")


def _part_mtimes(prefix: str) -> dict[str, int]:
    folder = Path(prefix) / "manifest"
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))}


@pytest.fixture
def finished_job(worker, redis_server, tmp_path, monkeypatch):
    """10 inputs (one missing at first) in 5 shards of 2, parts of 2 shards: 3 groups."""
    from cutout.jobs import manifest_parts
    from cutout.jobs.spec import JobSpec
    from cutout.jobs.submit import submit_job

    monkeypatch.setenv("CUTOUT_MANIFEST_GROUP_SHARDS", str(GROUP_SHARDS))
    monkeypatch.setenv("CUTOUT_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CUTOUT_BROKER_URL", redis_server.url)
    source = tmp_path / "in"
    files = generated_objects(10)
    for key, data in files.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    hidden = sorted(source.rglob("*.png"))[5]  # listed, then moved away: it fails NotFoundError
    list_file = tmp_path / "inputs.txt"
    list_file.write_text("".join(f"{p}\n" for p in sorted(source.rglob("*.png"))))
    hidden.rename(tmp_path / "kept.png")
    dest = tmp_path / "out"
    spec = JobSpec(sources=(str(list_file),), destination=str(dest), shard_size=SHARD_SIZE,
                   pipeline=pipeline_options())
    result = submit_job(spec, broker_url=redis_server.url, redis_url=redis_server.url)
    assert (result.items_total, result.shards_total) == (10, 5)
    _wait(lambda: manifest_parts.all_current(result.job_prefix), "parts not written", worker)
    return {"result": result, "dest": str(dest), "hidden": hidden, "kept": tmp_path / "kept.png",
            "inputs": {str(p) for p in sorted(source.rglob("*.png"))} | {str(hidden)}}


def test_parts_status_report_export_and_retry(finished_job, redis_server, tmp_path, worker):
    import duckdb
    import pyarrow.dataset as ds

    result, dest = finished_job["result"], finished_job["dest"]
    prefix, job_id = result.job_prefix, result.job_id
    folder = str(Path(prefix) / "manifest")
    assert sorted(os.listdir(folder)) == [f"part-0000000{g}.parquet" for g in range(3)]

    # One dataset, read in one call by pyarrow and by duckdb: every input exactly once.
    rows = ds.dataset(folder, format="parquet").to_table().to_pylist()
    assert sorted(r["input_uri"] for r in rows) == sorted(finished_job["inputs"])
    assert {r["job_id"] for r in rows} == {job_id}
    by_status = dict(duckdb.sql(f"SELECT status, count(DISTINCT input_uri) FROM read_parquet('{folder}/*.parquet') "
                                "GROUP BY status").fetchall())
    assert by_status == {"done": 9, "failed": 1}

    # status with Redis up: from the counters; of the job's files, a finished job's parts.json
    # and one listing of the roll-ups (every part written: nothing to say).
    with counted_requests() as calls:
        code, out = _cli_in_process("status", job_id)
    assert code == 3 and "10/10 inputs" in out and "NotFoundError ×1" in out, out
    assert _per_shard(calls) == [] and len(calls) <= 2, calls
    assert "seconds per input:" in out and "(finished)" in out and "parts written" not in out

    # A part lost (a lost build task): status says so, report writes it again.
    os.remove(Path(prefix) / "rollups" / "00000001.json")
    code, out = _cli_in_process("status", job_id)
    assert f"manifest: 2/3 parts written; `cutout report {job_id}`" in out, out

    code, out = _cli_in_process("report", job_id, "--json")  # rebuilds group 1 (reads its shards)
    assert json.loads(out)["manifest_parts"] == "3/3"

    # report: roll-ups, no record and no stats file read.
    with counted_requests() as calls:
        code, out = _cli_in_process("report", job_id, "--json")
    report = json.loads(out)
    assert code == 3 and report["counts"] == {"done": 9, "failed": 1} and report["complete"]
    assert _per_shard(calls) == [] and len(calls) <= 30 + result.shards_total // 100, calls

    # After FLUSHALL: the roll-ups and one listing of done-markers.
    redis_server.client().flushall()
    with counted_requests() as calls:
        code, out = _cli_in_process("status", job_id, "--dest", dest)
    assert code == 3 and "10/10 inputs" in out and "NotFoundError ×1" in out, out
    assert _per_shard(calls) == [], calls
    assert len(calls) <= 10 + 3, calls  # a few job files, two listings, one read per roll-up

    # The export, by the user: one JSONL file, in shard order.
    out_file = tmp_path / "manifest.jsonl"
    env = {**os.environ, "CUTOUT_REDIS_URL": redis_server.url}
    export = _cli("manifest", job_id, "--dest", dest, "--format", "jsonl", "--out", str(out_file), env=env)
    assert export.returncode == 0, export.stderr
    exported = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["shard_id"] for r in exported] == sorted(r["shard_id"] for r in exported)
    assert sorted(r["input_uri"] for r in exported) == sorted(finished_job["inputs"])

    # retry-failed, once the missing input is back: only its group's part is rewritten.
    hidden = finished_job["hidden"]
    finished_job["kept"].rename(hidden)
    failed_group = next(r for r in exported if r["status"] == "failed")["shard_id"]
    before = _part_mtimes(prefix)
    retry = _cli("retry-failed", job_id, "--dest", dest, "--broker", redis_server.url, "--redis",
                 redis_server.url, env=env)
    assert retry.returncode == 0, retry.stderr
    from cutout.jobs import manifest_parts

    group = int(failed_group[1:]) // GROUP_SHARDS
    changed = f"part-{group:08d}.parquet"
    _wait(lambda: manifest_parts.all_current(prefix) and _part_mtimes(prefix)[changed] != before[changed],
          "the retried group's part was not rewritten", worker)
    after = _part_mtimes(prefix)
    assert {name for name in after if after[name] != before[name]} == {changed}
    rows = ds.dataset(folder, format="parquet").to_table().to_pylist()
    assert {r["status"] for r in rows} == {"done"} and len(rows) == 10
    with counted_requests() as calls:  # retry rebuilt the live counters: Redis answers again
        code, out = _cli_in_process("status", job_id, "--dest", dest)
    assert code == 0 and "done 10" in out and _per_shard(calls) == [] and len(calls) <= 2, (out, calls)


def test_item_counters_move_before_the_shard_ends(redis_client, tmp_path):
    """The item loop reports each batch to the live counters: while the third batch is on the
    model, the first batch's inputs are already counted (and the shard is not done)."""
    from cutout.jobs.progress import LiveProgress
    from cutout.jobs.sharding import ShardItem
    from cutout.workers.items import CrashGuard, JobRecords, run_items
    from cutout.workers.pipeline import Pipeline

    files = generated_objects(6)
    items = []
    for index, (key, data) in enumerate(sorted(files.items())):
        path = tmp_path / f"in{index}.png"
        path.write_bytes(data)
        items.append(ShardItem(str(path), path.name, str(tmp_path / "out" / path.name)))
    progress = LiveProgress(redis_client, "job50")
    progress.set_total(6, 1)
    progress.shard_started("s000000", "w1")
    seen: list[int] = []
    real = Pipeline(pipeline_options())

    class Observed:
        def run(self, inputs, **kwargs):
            seen.append(progress.snapshot().processed)
            return real.run(inputs, **kwargs)

    sink = JobRecords()
    run_items(items, pipeline=lambda: Observed(), sink=sink, record_fields={"shard_id": "s000000"},
              guard=CrashGuard(progress, "s000000", "w1"), batch_size=2)
    assert len(seen) == 3 and seen[0] == 0 and seen[2] >= 2, seen
    snap = progress.snapshot()
    assert snap.processed == 6 and snap.shards_done == 0 and snap.rate_per_s >= 0  # not folded yet
    assert progress.shard_finished("s000000", list(sink.records.values()))
    assert progress.snapshot().counts == {"done": 6}
