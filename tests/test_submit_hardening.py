"""Submitting and reporting under trouble: a listing that breaks mid-way, forged task messages,
secrets in URLs, a flaky object store. Real redis-server, real files, moto's S3 server; shards
run by calling the plain shard function (what the Celery task does), except where a real worker
is the point."""
from __future__ import annotations

import pytest

from cutout.jobs.errors import TransientStorageError
from tests.test_submit import job, run_all_shards, submit  # noqa: F401 - the shared fixture


def _job_report(job):
    from cutout.jobs.submit import job_report

    return job_report(job["spec"].job_id, redis_url=job["url"])


def _assert_every_input_once(job) -> None:
    from cutout.jobs import manifest

    report = _job_report(job)
    assert report["complete"], report
    prefix = report["job_prefix"]
    inputs = [record.input_uri for record in manifest.iter_records(prefix)]
    assert sorted(inputs) == sorted(str(path) for path in job["paths"])


@pytest.mark.parametrize("finish_with", ["submit", "resume"])
def test_a_submit_that_breaks_mid_listing_is_finished_by_submit_or_resume(job, monkeypatch, finish_with):
    from cutout.jobs import manifest
    from cutout.jobs import submit as submit_module

    real = submit_module.iter_source_items

    def breaks_after_six(*args, **kwargs):
        for number, item in enumerate(real(*args, **kwargs)):
            if number == 6:
                raise TransientStorageError("listing failed mid-way (injected)")
            yield item

    monkeypatch.setattr(submit_module, "iter_source_items", breaks_after_six)
    with pytest.raises(TransientStorageError) as failure:
        submit(job)
    message = str(failure.value)
    assert "cutout submit" in message and f"cutout resume {job['spec'].job_id}" in message  # says how to finish
    from cutout.jobs.sharding import job_prefix

    prefix = job_prefix(job["spec"].destination, job["spec"].job_id)
    assert manifest.load_totals(prefix) is None
    run_all_shards(prefix)  # workers take what was enqueued before the failure
    assert manifest.done_shard_ids(prefix) == {"s000000"}

    monkeypatch.setattr(submit_module, "iter_source_items", real)
    if finish_with == "submit":
        result = submit(job)
    else:
        result = submit_module.resume_job(job["spec"].job_id, broker_url=job["url"], redis_url=job["url"])
    assert (result.shards_total, result.shards_already_done, result.shards_enqueued) == (3, 1, 2)
    run_all_shards(prefix)
    _assert_every_input_once(job)


def test_submit_skips_pipes_and_symlink_loops_and_says_how_many(job):
    """Before: the loop aborted the listing after shards were enqueued; the FIFO became an input."""
    import json
    import os
    from pathlib import Path

    from cutout.jobs import storage

    source = Path(job["spec"].sources[0])
    os.mkfifo(source / "set0" / "pipe.png")
    (source / "set1" / "loop").symlink_to(source)
    (source / "self.png").symlink_to(source / "self.png")
    result = submit(job)
    assert result.items_total == len(job["paths"])
    assert result.skipped == {"not a regular file": 1, "symlink loop": 2}
    totals = json.loads(storage.read_bytes(storage.join_uri(result.job_prefix, "totals.json")))
    assert totals["skipped"] == result.skipped
    run_all_shards(result.job_prefix)
    _assert_every_input_once(job)


# --- forged task messages -----------------------------------------------------------------------
def _tree(root) -> dict[str, tuple[int, int]]:
    import os

    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            status = os.stat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (status.st_size, status.st_mtime_ns)
    return found


@pytest.mark.parametrize("forge", ["shard-traversal", "shard-nested", "prefix-traversal", "shard-newline"])
def test_a_forged_task_is_refused_before_anything_is_read_or_written(job, tmp_path, forge):
    """A task naming ``../../../../../outside/evil`` as its shard made the worker read a shard
    file planted outside the job, write its output there and overwrite the planted file."""
    import json

    from celery.exceptions import Reject

    from cutout.workers.tasks import process_shard_task

    result = submit(job)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.jsonl").write_text(json.dumps(
        {"uri": str(job["paths"][0]), "rel_key": "x.png", "output_uri": str(outside / "evil_out.png")}) + "\n")
    prefix, shard_id = result.job_prefix, "s000000"
    if forge == "shard-traversal":
        shard_id = "../../../../../outside/evil"  # prefix/shards/<this>.jsonl is outside/evil.jsonl
    elif forge == "shard-nested":
        shard_id = "s000000/../../../../../../outside/evil"
    elif forge == "prefix-traversal":
        prefix = prefix.replace("/_cutout/", "/../outside/../out/_cutout/")
    else:
        shard_id = "s000000\n"
    before = _tree(tmp_path)
    with pytest.raises(Reject, match="InvalidIdError"):
        process_shard_task(prefix, shard_id)
    assert _tree(tmp_path) == before  # nothing written anywhere, the planted file untouched
    assert not (outside / "evil_out.png").exists()


# --- the worker's allowlist -----------------------------------------------------------------------
def test_an_input_outside_the_allowlist_is_refused_and_its_neighbours_finish(job, tmp_path, monkeypatch):
    """A list file naming /etc/hostname: before, the worker read it with its own rights."""
    from cutout.jobs import manifest
    from cutout.jobs.spec import JobSpec
    from cutout.jobs.submit import submit_job

    good = [str(path) for path in job["paths"] if path.name not in job["bad"]]
    listing = tmp_path / "in" / "list.txt"
    listing.write_text("\n".join([good[0], "/etc/hostname", "file:///etc/passwd", *good[1:4]]) + "\n")
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", f"s3://,{(tmp_path / 'in').as_uri()}/")
    spec = JobSpec(sources=(str(listing),), destination=(tmp_path / "out").as_uri(),
                   pipeline=job["spec"].pipeline, shard_size=3)
    result = submit_job(spec, broker_url=job["url"], redis_url=job["url"])
    run_all_shards(result.job_prefix)
    records = {record.input_uri: record for record in manifest.iter_records(result.job_prefix)}
    assert len(records) == 6
    for refused in ("/etc/hostname", "/etc/passwd"):
        assert records[refused].error_class == "SourceNotAllowedError", records[refused]
        assert "CUTOUT_ALLOWED_SOURCES" in records[refused].error
    assert all(records[path].status == "done" for path in good[:4])


# --- status and report on a flaky store ----------------------------------------------------------
def test_report_survives_a_quarter_of_requests_failing(bucket, s3_fault_proxy, monkeypatch):
    """Before: one read given up (one retry policy round) failed the whole report; with 3
    attempts a call and about 130 requests a report, nearly every report failed."""
    import time

    from cutout.jobs import manifest, sharding
    from cutout.jobs.records import ItemRecord, ShardStats
    from cutout.jobs.spec import JobSpec
    from cutout.jobs.submit import job_report

    shards = 60
    destination = f"s3://{bucket()}/out"
    spec = JobSpec(sources=("s3://in/",), destination=destination)
    prefix = sharding.job_prefix(destination, spec.job_id)
    manifest.save_spec(prefix, spec)
    for index in range(shards):
        shard_id = sharding.shard_id_for(index)
        records = [ItemRecord(input_uri=f"s3://in/{shard_id}/{n}.jpg", status="done", shard_id=shard_id)
                   for n in range(2)]
        stats = ShardStats(job_id=spec.job_id, shard_id=shard_id, counts={"done": 2},
                           started_at=time.time(), finished_at=time.time())
        manifest.write_shard_result(prefix, shard_id, records, stats)
    manifest.save_totals(prefix, 2 * shards, shards)

    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "3")
    s3_fault_proxy.fail_fraction(0.25)
    for _ in range(3):
        report = job_report(spec.job_id, destination=destination)
        assert report["complete"] and report["counts"] == {"done": 2 * shards}
        assert report["shards_done"] == shards
    assert s3_fault_proxy.requests_failed > 20  # the first report builds the part: ~130 requests
    s3_fault_proxy.reset()
    from cutout.jobs import manifest_parts

    assert len(list(manifest_parts.iter_rows(prefix))) == 2 * shards  # the parts report wrote
