"""One place builds a job's durable paths, from ids checked against what the submitter makes."""
from __future__ import annotations

import pytest

from cutout.jobs.errors import InvalidIdError
from cutout.jobs.layout import group_of_name, JobLayout, check_task

JOB = "0123456789abcdef"


@pytest.mark.parametrize("destination", ["s3://b/out", "s3://b/out/", "file:///data/out", "/data/out"])
def test_paths_and_round_trip(destination):
    layout = JobLayout(destination, JOB)
    base = destination.rstrip("/") + f"/_cutout/jobs/{JOB}"
    assert layout.prefix == base
    assert (layout.spec, layout.totals) == (f"{base}/spec.json", f"{base}/totals.json")
    assert layout.shard("s000007") == f"{base}/shards/s000007.jsonl"
    assert layout.records("s1000000") == f"{base}/records/s1000000.jsonl"
    assert layout.stats("s000007") == f"{base}/stats/s000007.json"
    assert layout.part(12) == f"{base}/manifest/part-00000012.parquet"
    assert layout.rollup(12) == f"{base}/rollups/00000012.json"
    assert group_of_name(layout.part(12)) == 12 == group_of_name(layout.rollup(12))
    assert group_of_name(f"{base}/manifest/part-1.parquet.tmp") is None
    assert JobLayout.from_prefix(layout.prefix) == JobLayout(destination.rstrip("/"), JOB)


@pytest.mark.parametrize("job_prefix", [
    f"s3://b/out/_cutout/jobs/{JOB}/..", f"s3://b/out/../x/_cutout/jobs/{JOB}", f"/a/./b/_cutout/jobs/{JOB}",
    "s3://b/out/_cutout/jobs/job42", f"s3://b/out/_cutout/jobs/{JOB.upper()}", f"s3://b/out/{JOB}",
    f"s3://b/out/_cutout/jobs/{JOB}\n", f"s3://b\\out/_cutout/jobs/{JOB}", f"s3://b/out/_cutout/jobs/{JOB}/", None, 7,
])
def test_forged_job_prefixes_are_refused(job_prefix):
    with pytest.raises(InvalidIdError):
        JobLayout.from_prefix(job_prefix)


@pytest.mark.parametrize("shard_id", ["../../x", "s000001/../../x", "s00001", "s000001.jsonl", "S000001",
                                      "s000001\n", "", None, ["s000001"], "s" + "9" * 13])
def test_forged_shard_ids_are_refused(shard_id):
    layout = JobLayout("s3://b/out", JOB)
    with pytest.raises(InvalidIdError):
        layout.records(shard_id)
    with pytest.raises(InvalidIdError):
        check_task(layout.prefix, shard_id)


def test_outputs_must_stay_below_the_destination_and_outside_the_control_area():
    layout = JobLayout("file:///data/out", JOB)
    assert layout.holds_output("file:///data/out/a/b.png")
    assert layout.holds_output("/data/out/a/b.png")  # the same place written as a path
    for uri in ("file:///data/out2/a.png", "file:///data/out/../etc/x.png", "file:///data/out/_cutout/x.png",
                "/data/out/../x.png", "file:///data/out/a//b.png", "file:///data/out/a\x00.png"):
        assert not layout.holds_output(uri), uri
