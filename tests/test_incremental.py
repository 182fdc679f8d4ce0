"""``cutout submit --incremental`` on a growing source, with a real redis-server and a real worker:
only the new inputs are processed, and the manifest parts, written by the workers that finish
each group's last shard (no ``report`` call), keep exactly one record per input across the runs."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.test_job_integration import (
    REPO_ROOT,
    WORKER_ENV,
    WorkerFleet,
    as_path,
    generated_objects,
    pipeline_options,
)
from tests.services import LOCAL_TEST_SOURCES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(redis_server, tmp_path_factory):
    env = {**os.environ, **WORKER_ENV, **LOCAL_TEST_SOURCES, "CUTOUT_BROKER_URL": redis_server.url,
           "CUTOUT_REDIS_URL": redis_server.url}
    fleet = WorkerFleet(env, tmp_path_factory.mktemp("worker-logs"))
    fleet.ensure(1)
    yield fleet
    fleet.stop()


def _write(folder, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)


def _wait_for_manifest(prefix: str, rows: int, fleet, timeout: float = 120) -> list[dict]:
    """The worker that finishes a group's last shard writes its manifest part: wait for the parts
    to hold ``rows``."""
    from cutout.jobs import manifest_parts

    deadline = time.monotonic() + timeout
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = list(manifest_parts.iter_rows(prefix))
        if len(records) >= rows:
            return records
        time.sleep(0.3)
    pytest.fail(f"manifest has {len(records)}/{rows} rows\n{fleet.all_logs()}")


def _stats_finish_times(prefix: str) -> dict[str, float]:
    from cutout.jobs import manifest

    return {s.shard_id: s.finished_at for s in manifest.iter_shard_stats(prefix)}


def test_incremental_submit_processes_only_new_inputs(worker, redis_server, tmp_path):
    from cutout.jobs.spec import JobSpec
    from cutout.jobs.submit import submit_job

    source, dest = tmp_path / "in", tmp_path / "out"
    first = generated_objects(10, seed=3)
    _write(source, first)
    spec = JobSpec(sources=(str(source),), destination=str(dest), pipeline=pipeline_options(), shard_size=4)
    result = submit_job(spec, broker_url=redis_server.url, redis_url=redis_server.url)
    assert (result.items_total, result.shards_total) == (10, 3)
    records = _wait_for_manifest(result.job_prefix, 10, worker)
    assert {r["status"] for r in records} == {"done"}
    assert {r["job_id"] for r in records} == {spec.job_id}
    before = _stats_finish_times(result.job_prefix)

    # The bucket grows: five new objects, one of them named so its output collides with an old one.
    added = {key.replace("object_", "new_"): data for key, data in generated_objects(4, seed=9).items()}
    added["generated/00/object_000.jpg"] = first["generated/00/object_001.png"]
    _write(source, added)
    env = {**os.environ, "CUTOUT_BROKER_URL": redis_server.url, "CUTOUT_REDIS_URL": redis_server.url}
    command = [sys.executable, "-m", "cutout.jobs.cli", "submit", str(source), "--to", str(dest),
               "--model", "threshold", "--matting", "none", "--max-pixels", "1000000", "--shard-size", "4",
               "--incremental"]
    submitted = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.split()[0] == spec.job_id  # the same job, extended
    assert "5 new inputs" in submitted.stderr and "2 enqueued" in submitted.stderr, submitted.stderr

    records = _wait_for_manifest(result.job_prefix, 15, worker)
    inputs = [as_path(r["input_uri"]) for r in records]
    assert sorted(inputs) == sorted(str(source / key) for key in {**first, **added})  # once each
    after = _stats_finish_times(result.job_prefix)
    assert {k: after[k] for k in before} == before  # old shards were not run again
    assert sorted(set(after) - set(before)) == ["s000003", "s000004"]
    new_records = [r for r in records if r["shard_id"] in ("s000003", "s000004")]
    assert sorted(as_path(r["input_uri"]) for r in new_records) == sorted(str(source / k) for k in added)
    outputs = [as_path(u) for r in records for u in r["output_uris"]]
    assert len(outputs) == len(set(outputs)) == 15  # the colliding name got its own output
    assert (dest / "generated/00/object_000.jpg.png").is_file()

    # Nothing new: nothing is enqueued and the job is unchanged.
    again = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "0 new inputs" in again.stderr and "0 enqueued" in again.stderr, again.stderr
    from cutout.jobs import manifest

    assert manifest.load_totals(result.job_prefix) == (15, 5)


def test_incremental_first_submit_is_an_ordinary_submit(redis_server, tmp_path):
    from cutout.jobs import manifest
    from cutout.jobs.spec import JobSpec
    from cutout.jobs.submit import submit_incremental

    source = tmp_path / "in"
    _write(source, generated_objects(3))
    spec = JobSpec(sources=(str(source),), destination=str(tmp_path / "out"), pipeline=pipeline_options(),
                   queue="cutout-nobody-listens")  # no worker takes it: only the submit is checked
    result = submit_incremental(spec, broker_url=redis_server.url, redis_url=redis_server.url)
    assert (result.items_new, result.shards_enqueued) == (3, 1)
    assert manifest.load_totals(result.job_prefix) == (3, 1)
