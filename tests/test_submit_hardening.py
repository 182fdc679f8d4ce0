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
