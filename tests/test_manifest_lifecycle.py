"""The manifest's lifecycle: a Parquet part per group of shards, written when the group's last
shard finishes (race-safe), rewritten only where a retry or a redo changed its group, read back
as one dataset by pyarrow and duckdb, with a ``job_id`` column and a list file's extra columns."""
from __future__ import annotations

import csv
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cutout.jobs import manifest, manifest_parts, sharding, storage
from cutout.jobs.progress import LiveProgress
from cutout.jobs.records import ItemRecord, ShardStats
from cutout.jobs.sources import iter_source_items

JOB = "0123456789abcdef"


@pytest.fixture(autouse=True)
def two_shards_per_group(monkeypatch):
    monkeypatch.setenv("CUTOUT_MANIFEST_GROUP_SHARDS", "2")


@pytest.fixture(params=["local", "s3"])
def job_prefix(request, tmp_path):
    dest = str(tmp_path / "dest") if request.param == "local" else f"s3://{request.getfixturevalue('bucket')()}/dest"
    prefix = sharding.job_prefix(dest, JOB)
    manifest_parts.save_parts_layout(prefix, 2)
    return prefix


def _local_prefix(tmp_path, job_id: str = JOB) -> str:
    prefix = sharding.job_prefix(str(tmp_path / "out"), job_id)
    manifest_parts.save_parts_layout(prefix, 2)
    return prefix


def _finish(prefix: str, shard_id: str, n: int = 2, status: str = "done", flags=(), job_id: str = JOB) -> list:
    records = [ItemRecord(input_uri=f"s3://in/{shard_id}/{i}.jpg", status=status, shard_id=shard_id,
                          flags=list(flags), quality={"alpha_coverage": 0.5}, timings={"segment": 0.5})
               for i in range(n)]
    _write(prefix, shard_id, records, job_id)
    return records


def _write(prefix: str, shard_id: str, records: list, job_id: str = JOB) -> None:
    counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
    stats = ShardStats(job_id=job_id, shard_id=shard_id, counts=counts,
                       started_at=time.time() - 1, finished_at=time.time())
    manifest.write_shard_result(prefix, shard_id, records, stats)


def _part_rows(prefix: str, group: int) -> list[dict]:
    return manifest_parts.read_part(prefix, group).to_pylist()


def _dataset_rows(prefix: str) -> list[dict]:
    """The manifest folder as one dataset, the way a user reads it (pyarrow.dataset)."""
    import pyarrow.dataset as ds

    folder = storage.join_uri(prefix, "manifest")
    if folder.startswith("s3://"):
        filesystem = _s3_filesystem()
        return ds.dataset(folder[len("s3://"):], format="parquet", filesystem=filesystem).to_table().to_pylist()
    return ds.dataset(folder, format="parquet").to_table().to_pylist()


def _s3_filesystem():
    import pyarrow.fs as pafs

    endpoint = os.environ["AWS_ENDPOINT_URL"].split("://", 1)
    return pafs.S3FileSystem(endpoint_override=endpoint[1], scheme=endpoint[0], region="us-east-1",
                             access_key=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                             secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))


def _mtimes(prefix: str) -> dict[str, int]:
    folder = storage._local_path(storage.join_uri(prefix, "manifest"))
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


def test_a_part_is_written_when_its_group_is_done_and_the_folder_reads_as_one_dataset(job_prefix):
    manifest.save_totals(job_prefix, 6, 3)
    _finish(job_prefix, "s000000")
    assert not manifest_parts.build_group(job_prefix, 0).written  # s000001 is not done
    assert manifest_parts.part_groups(job_prefix) == []
    _finish(job_prefix, "s000001")
    assert manifest_parts.build_group(job_prefix, 0).written
    _finish(job_prefix, "s000002", flags=["empty_alpha"])
    assert manifest_parts.build_group(job_prefix, 1).rows == 2  # the last group has one shard
    rows = _dataset_rows(job_prefix)
    assert sorted(r["input_uri"] for r in rows) == sorted(f"s3://in/s00000{s}/{i}.jpg" for s in range(3) for i in range(2))
    assert {r["job_id"] for r in rows} == {JOB}
    assert [r["flags"] for r in _part_rows(job_prefix, 1)] == [["empty_alpha"]] * 2
    rollup = manifest_parts.load_rollups(job_prefix)[1]
    assert rollup["fields"] == {"status:done": 2, "flag:empty_alpha": 2, "time:segment": 1.0}
    assert [s["id"] for s in rollup["shards"]] == ["s000002"]


def test_duckdb_reads_the_parts_of_a_local_destination(tmp_path):
    import duckdb

    prefix = _local_prefix(tmp_path)
    manifest.save_totals(prefix, 10, 5)
    for index in range(5):
        _finish(prefix, sharding.shard_id_for(index), status="failed" if index == 3 else "done")
    assert manifest_parts.build_missing(prefix) == [0, 1, 2]
    folder = storage.join_uri(prefix, "manifest")
    counts = duckdb.sql(f"SELECT status, count(*), count(DISTINCT input_uri) FROM "
                        f"read_parquet('{folder}/*.parquet') GROUP BY status ORDER BY status").fetchall()
    assert counts == [("done", 8, 8), ("failed", 2, 2)]


def test_a_group_waits_for_submit_to_finish(tmp_path):
    prefix = _local_prefix(tmp_path)
    _finish(prefix, "s000000")
    _finish(prefix, "s000001")  # the group is done, but submit has not written totals.json
    assert manifest_parts.build_group(prefix, 0).reason == manifest_parts.WAITING_FOR_SUBMIT


def test_the_worker_that_finishes_a_group_writes_it_or_sends_its_task(tmp_path, redis_client, monkeypatch):
    prefix = _local_prefix(tmp_path)
    manifest.save_totals(prefix, 6, 3)
    progress = LiveProgress(redis_client, JOB)
    progress.set_total(6, 3)
    sent: list[tuple[str, int]] = []

    def finish(shard_id: str) -> None:
        progress.shard_finished(shard_id, _finish(prefix, shard_id))
        manifest_parts.after_shard(prefix, shard_id, progress, lambda p, g: sent.append((p, g)))

    finish("s000000")
    assert manifest_parts.part_groups(prefix) == []  # its group's other shard is still running
    finish("s000001")
    assert manifest_parts.part_groups(prefix) == [0] and sent == []  # a small group: inline
    monkeypatch.setenv("CUTOUT_MANIFEST_INLINE_SHARDS", "0")
    finish("s000002")
    assert sent == [(prefix, 1)] and manifest_parts.part_groups(prefix) == [0]  # a task builds it


def test_two_workers_finishing_a_group_together_leave_a_whole_part(job_prefix, redis_client):
    manifest.save_totals(job_prefix, 40, 20)
    progress = LiveProgress(redis_client, JOB)
    progress.set_total(40, 20)
    barrier = threading.Barrier(2)

    def last_shard(index: int) -> None:
        shard_id = sharding.shard_id_for(index)
        records = _finish(job_prefix, shard_id)
        barrier.wait()
        progress.shard_finished(shard_id, records)
        manifest_parts.after_shard(job_prefix, shard_id, progress, lambda p, g: None)

    threads = [threading.Thread(target=last_shard, args=(i,)) for i in (18, 19)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = _part_rows(job_prefix, 9)
    assert sorted(r["input_uri"] for r in rows) == [f"s3://in/s0000{s}/{i}.jpg" for s in (18, 19) for i in range(2)]


def test_a_retry_rewrites_only_the_part_of_its_group(tmp_path):
    prefix = _local_prefix(tmp_path)
    manifest.save_totals(prefix, 6, 3)
    _finish(prefix, "s000000")
    _finish(prefix, "s000001", status="failed")
    _finish(prefix, "s000002")
    manifest_parts.build_missing(prefix)
    before = _mtimes(prefix)
    time.sleep(0.02)
    manifest.reopen_shard(prefix, "s000001")  # what retry-failed does
    assert manifest_parts.groups_state(prefix).ready_to_build() == []  # not done again yet
    _finish(prefix, "s000001", status="done")
    assert manifest_parts.build_missing(prefix) == [0]
    after = _mtimes(prefix)
    assert after["part-00000001.parquet"] == before["part-00000001.parquet"]
    assert after["part-00000000.parquet"] != before["part-00000000.parquet"]
    assert {r["status"] for r in _part_rows(prefix, 0)} == {"done"}


def test_new_shards_of_an_incremental_submit_rewrite_the_last_group(tmp_path):
    prefix = _local_prefix(tmp_path)
    manifest.save_totals(prefix, 2, 1)
    _finish(prefix, "s000000")
    assert manifest_parts.build_missing(prefix) == [0]
    manifest.save_totals(prefix, 6, 3)  # two more shards: group 0 now has two
    _finish(prefix, "s000001")
    _finish(prefix, "s000002")
    state = manifest_parts.groups_state(prefix)
    assert not state.current(0) and state.ready_to_build() == [0, 1]
    manifest_parts.build_missing(prefix, state)
    assert len(_part_rows(prefix, 0)) == 4


def test_a_redo_rewrites_the_parent_groups_it_touches(tmp_path):
    parent = _local_prefix(tmp_path)
    manifest.save_totals(parent, 8, 4)
    for index in range(4):
        _finish(parent, sharding.shard_id_for(index), flags=["empty_alpha"] if index == 3 else ())
    manifest_parts.build_missing(parent)
    before = _mtimes(parent)
    child_id = "fedcba9876543210"
    child = sharding.job_prefix(str(tmp_path / "out"), child_id)
    manifest_parts.save_parts_layout(child, 2)
    manifest.save_totals(child, 2, 1)
    manifest.link_followup(parent, child_id, {"s000000": ["s000003"]})
    redone = [ItemRecord(input_uri=f"s3://in/s000003/{i}.jpg", status="done", shard_id="s000000",
                         job_id=child_id, config_hash="new") for i in range(2)]
    _write(child, "s000000", redone, child_id)
    sent = []
    assert manifest_parts.build_and_propagate(child, 0, lambda p, g: sent.append(g)).written
    after = _mtimes(parent)
    assert after["part-00000000.parquet"] == before["part-00000000.parquet"]  # untouched group
    rows = _part_rows(parent, 1)
    assert [(r["job_id"], r["flags"]) for r in rows if r["shard_id"] == "s000000"] == [(child_id, [])] * 2
    assert manifest_parts.load_rollups(parent)[1]["fields"].get("flag:empty_alpha") is None  # latest records
    assert manifest_parts.load_rollups(parent)[1]["followups"] == [child_id]


def test_live_progress_is_rebuilt_from_the_rollups(tmp_path, redis_client):
    prefix = _local_prefix(tmp_path)
    manifest.save_totals(prefix, 6, 3)
    for index in range(3):
        _finish(prefix, sharding.shard_id_for(index), status="failed" if index == 1 else "done")
    manifest_parts.build_group(prefix, 0)  # group 1 has no roll-up: its shard is read
    progress = LiveProgress(redis_client, JOB)
    assert progress.rebuild_from_durable(prefix) == 3
    snap = progress.snapshot()
    assert (snap.counts, snap.shards_done, snap.shards_total) == ({"done": 4, "failed": 2}, 3, 3)
    assert snap.tally.stage_seconds == {"segment": pytest.approx(3.0)}
    assert progress.rebuild_from_durable(prefix) == 0  # idempotent


def _png(value: int) -> bytes:
    image = np.full((40, 40, 3), 230, np.uint8)
    image[10:30, 10:30] = value
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_list_file_columns_reach_the_manifest(tmp_path, kind, monkeypatch):
    """img2dataset's save_additional_columns: the list's other columns travel in the shard file
    next to the URI and appear in each input's manifest row (a real shard run, threshold model)."""
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", tmp_path.as_uri() + "/")
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import ExtraColumns
    from cutout.workers.shard import process_shard

    rows = []
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(_png(20 * i))
        rows.append({"url": f"img{i}.png", "caption": f"a square {i}", "status": f"s{i}"})
    rows.append({"url": "missing.png", "caption": "gone", "status": "x"})
    list_file = tmp_path / f"list.{kind}"
    if kind == "csv":
        with open(list_file, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["url", "caption", "status"])
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        list_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), list_file)
    dest = str(tmp_path / "out")
    spec = JobSpec(sources=(str(list_file),), destination=dest, shard_size=2,
                   pipeline=PipelineOptions(model="threshold", matting="none"))
    prefix = sharding.job_prefix(dest, spec.job_id)
    manifest.save_spec(prefix, spec)
    columns = ExtraColumns()
    shards = list(sharding.iter_shards(columns.watch(iter_source_items(spec.sources)), destination=dest,
                                       extension=".png", shard_size=2))
    for shard in shards:
        sharding.write_shard(prefix, shard)
    manifest.save_totals(prefix, 4, len(shards), extra_columns=columns.names)
    assert columns.names == ["caption", "status"]
    for shard in shards:
        process_shard(prefix, shard.shard_id)
    assert manifest_parts.build_missing(prefix) == [0]
    by_name = {r["input_uri"].rsplit("/", 1)[-1]: r for r in _dataset_rows(prefix)}
    assert by_name["img1.png"]["caption"] == "a square 1"
    assert by_name["img1.png"]["extra_status"] == "s1"  # a record field keeps its meaning
    assert by_name["img1.png"]["status"] == "done"
    assert by_name["missing.png"]["status"] == "failed"
    assert by_name["missing.png"]["caption"] == "gone"
    assert by_name["img0.png"]["job_id"] == spec.job_id
