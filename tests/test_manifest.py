"""cutout.jobs.manifest (durable records, local and S3) and cutout.jobs.progress (live, real redis-server)."""
from __future__ import annotations

import json
import threading
import time

import pytest

from cutout.jobs import manifest, sharding, storage
from cutout.jobs.errors import NotFoundError
from cutout.jobs.progress import LiveProgress
from cutout.jobs.records import ItemRecord, ShardStats
from cutout.jobs.spec import JobSpec


@pytest.fixture(params=["local", "s3"])
def job_prefix(request, tmp_path):
    dest = str(tmp_path / "dest") if request.param == "local" else f"s3://{request.getfixturevalue('bucket')()}/dest"
    return sharding.job_prefix(dest, "0000000000000042")


def _record(shard_id: str, n: int, status: str = "done", error: str | None = None) -> ItemRecord:
    failed = status == "failed"
    return ItemRecord(
        input_uri=f"s3://in/{shard_id}/{n}.jpg", status=status, shard_id=shard_id,
        output_uris=[] if failed else [f"s3://out/{shard_id}/{n}.png"], stage="decode" if failed else None,
        error_class="TruncatedImageError" if failed else None, error=error, timings={"decode": 0.01 * n},
    )


def _finish(prefix: str, shard_id: str, records: list[ItemRecord], top_errors=None) -> ShardStats:
    counts: dict[str, int] = {}
    classes: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
        if record.error_class:
            classes[record.error_class] = classes.get(record.error_class, 0) + 1
    stats = ShardStats(job_id="job42", shard_id=shard_id, counts=counts, error_classes=classes,
                       top_errors=top_errors or {}, started_at=time.time() - 1, finished_at=time.time())
    manifest.write_shard_result(prefix, shard_id, records, stats)
    return stats


def _write_shards(prefix: str, count: int) -> None:
    for index in range(count):
        shard_id = sharding.shard_id_for(index)
        items = [sharding.ShardItem(f"s3://in/{shard_id}/{n}.jpg", f"{n}.jpg", f"s3://out/{n}.png") for n in range(2)]
        sharding.write_shard(prefix, sharding.Shard(shard_id, items))


def test_stats_file_is_the_done_marker(job_prefix):
    _write_shards(job_prefix, 3)
    _finish(job_prefix, "s000000", [_record("s000000", 0), _record("s000000", 1)])
    # a worker that died between the two writes: records but no stats
    storage.write_bytes(storage.join_uri(job_prefix, "records", "s000001.jsonl"),
                        (_record("s000001", 0).model_dump_json() + "\n").encode())
    assert manifest.done_shard_ids(job_prefix) == {"s000000"}
    assert manifest.all_shard_ids(job_prefix) == ["s000000", "s000001", "s000002"]
    assert manifest.shard_done(job_prefix, "s000000") and not manifest.shard_done(job_prefix, "s000001")
    assert [r.shard_id for r in manifest.iter_records(job_prefix)] == ["s000000", "s000000"]
    assert len(manifest.read_shard_records(job_prefix, "s000001")) == 1
    assert manifest.read_shard_records(job_prefix, "s000002") == []


def test_records_round_trip(job_prefix):
    records = [_record("s000003", 0), _record("s000003", 1, "failed", "truncated at byte 100")]
    stats = _finish(job_prefix, "s000003", records)
    assert manifest.read_shard_records(job_prefix, "s000003") == records
    assert manifest.read_shard_stats(job_prefix, "s000003") == stats


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_parts_and_export_in_shard_order(job_prefix, fmt, tmp_path, monkeypatch):
    """Parts of 2 shards; the export lists every row in shard order (s000010 sorts before
    s000002 as text, part 10 before part 2 would too without zero-padding)."""
    from cutout.jobs import manifest_parts
    from cutout.jobs.manifest_export import export_manifest

    monkeypatch.setenv("CUTOUT_MANIFEST_GROUP_SHARDS", "2")
    manifest_parts.save_parts_layout(job_prefix, 8)
    shard_ids = [sharding.shard_id_for(i) for i in range(22)]
    manifest.save_totals(job_prefix, 3 * len(shard_ids), len(shard_ids))
    for shard_id in reversed(shard_ids):
        _finish(job_prefix, shard_id, [_record(shard_id, n) for n in range(3)])
    assert manifest_parts.build_missing(job_prefix) == list(range(11))
    assert manifest_parts.part_groups(job_prefix) == list(range(11))
    out = tmp_path / f"manifest.{fmt}"
    result = export_manifest(job_prefix, fmt, str(out), threads=4)
    assert (result.rows, result.parts, result.groups_missing) == (66, 11, 0)
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    elif fmt == "csv":
        import csv

        rows = list(csv.DictReader(out.open()))
        for row in rows:
            row["timings"], row["output_uris"] = json.loads(row["timings"]), json.loads(row["output_uris"])
    else:
        import pyarrow.parquet as pq

        rows = [manifest_parts.plain_row(row) for row in pq.read_table(out).to_pylist()]
    assert [r["input_uri"] for r in rows] == [f"s3://in/{s}/{n}.jpg" for s in shard_ids for n in range(3)]
    assert rows[1]["timings"] == {"decode": 0.01}
    assert list(rows[1]["output_uris"]) == ["s3://out/s000000/1.png"]


def test_summarise(job_prefix):
    spec = JobSpec(sources=("s3://in/",), destination="s3://out/")
    job_prefix = _prefix_of(job_prefix, spec)  # a spec lives under its own job id
    manifest.save_spec(job_prefix, spec)
    _write_shards(job_prefix, 3)
    manifest.save_totals(job_prefix, n_items=6, n_shards=3)
    _finish(job_prefix, "s000000", [_record("s000000", 0), _record("s000000", 1, "failed", "bad")],
            top_errors={"TruncatedImageError: bad": 1})
    _finish(job_prefix, "s000001", [_record("s000001", 0, "failed", "bad"), _record("s000001", 1, "skipped")],
            top_errors={"TruncatedImageError: bad": 1})
    summary = manifest.summarise(job_prefix, top_errors_limit=5)  # no roll-up yet: reads the stats
    assert summary.counts == {"done": 1, "failed": 2, "skipped": 1}
    assert summary.error_classes == {"TruncatedImageError": 2}
    assert summary.top_errors == {"TruncatedImageError: bad": 2}
    assert (summary.shards_done, summary.shards_total, summary.items_total) == (2, 3, 6)
    assert not summary.complete and summary.manifest_uri is None
    _finish(job_prefix, "s000002", [_record("s000002", 0), _record("s000002", 1)])
    summary = manifest.summarise(job_prefix, build=True)  # report's path: builds the done group
    assert summary.manifest_uri == storage.join_uri(job_prefix, "manifest") + "/"
    assert (summary.groups_current, summary.groups_total, summary.complete) == (1, 1, True)
    assert summary.counts == {"done": 3, "failed": 2, "skipped": 1}
    assert summary.stage_seconds == {"decode": pytest.approx(0.01 * 3)}  # from the records


def test_summary_keeps_error_messages_capped(tmp_path):
    prefix = sharding.job_prefix(str(tmp_path), "0000000000000001")
    for index in range(30):
        shard_id = sharding.shard_id_for(index)
        _finish(prefix, shard_id, [_record(shard_id, 0, "failed", f"msg {index}")],
                top_errors={f"E: msg {index}": 1, "(other messages)": 2})
    summary = manifest.summarise_full(prefix, top_errors_limit=10)
    assert len(summary.top_errors) == 11
    assert summary.top_errors["(other messages)"] == 20 + 30 * 2
    assert sum(summary.top_errors.values()) == 90
    assert summary.items_total is None and summary.shards_total == 0  # no shard files written


def test_spec_round_trip(job_prefix):
    spec = JobSpec(sources=("a/", "b.txt"), destination="s3://x/", shard_size=7, suffix="_c")
    job_prefix = _prefix_of(job_prefix, spec)
    manifest.save_spec(job_prefix, spec)
    assert manifest.load_spec(job_prefix) == spec
    with pytest.raises(NotFoundError, match="no job spec"):
        manifest.load_spec(job_prefix[:-1] + ("0" if job_prefix[-1] != "0" else "1"))


def test_a_spec_under_another_jobs_id_is_refused(job_prefix):
    from cutout.jobs.errors import InvalidIdError

    manifest.save_spec(job_prefix, JobSpec(sources=("a/",), destination="s3://x/"))
    with pytest.raises(InvalidIdError, match="is job"):
        manifest.load_spec(job_prefix)


def _prefix_of(job_prefix: str, spec: JobSpec) -> str:
    return job_prefix.rsplit("/", 1)[0] + "/" + spec.job_id


# --- live progress ------------------------------------------------------------------------------
def test_redelivered_shard_is_counted_once(redis_client):
    progress = LiveProgress(redis_client, "job42")
    progress.set_total(n_items=10, n_shards=5)
    progress.shard_started("s000000", "w1")
    assert progress.snapshot().in_flight == 1
    assert progress.shard_finished("s000000", {"done": 1, "failed": 1}) is True
    assert progress.shard_finished("s000000", {"done": 2}) is False  # redelivered
    snap = progress.snapshot()
    assert snap.counts == {"done": 1, "failed": 1}
    assert (snap.total, snap.shards_done, snap.shards_total, snap.in_flight) == (10, 1, 5, 0)
    assert snap.processed == 2


def test_concurrent_redeliveries_count_once(redis_server):
    progress = LiveProgress(redis_server.client(), "race")
    barrier = threading.Barrier(8)

    def finish():
        client = LiveProgress(redis_server.client(), "race")
        barrier.wait()
        client.shard_finished("s000007", {"done": 3})

    threads = [threading.Thread(target=finish) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.snapshot().counts == {"done": 3}


def test_workers_cancel_and_ttl(redis_client):
    progress = LiveProgress(redis_client, "job43", ttl_s=1000)
    progress.heartbeat("w1")
    progress.shard_started("s000001", "w2")
    progress.shard_finished("s000001", {"done": 4})
    assert progress.snapshot().workers_alive == 2
    assert not progress.is_cancelled()
    progress.cancel()
    assert progress.is_cancelled() and progress.snapshot().cancelled
    keys = redis_client.keys("cutout:job:job43:*")
    assert keys and all(0 < redis_client.ttl(k) <= 1000 for k in keys)
    progress.clear()
    assert redis_client.keys("cutout:job:job43:*") == []


def test_crash_history_counts_each_dead_attempt_once(redis_client):
    progress = LiveProgress(redis_client, "job45", ttl_s=1000)
    assert progress.crash_history("s000000") == {}
    progress.batch_on_model("s000000", ["a.png", "b.png"])
    progress.batch_off_model("s000000")  # a batch that finished: no crash
    assert progress.crash_history("s000000") == {}

    progress.batch_on_model("s000000", ["a.png", "b.png"])  # the attempt dies here
    assert progress.crash_history("s000000") == {"a.png": 0, "b.png": 0}  # suspects, not alone
    assert progress.crash_history("s000000") == {"a.png": 0, "b.png": 0}  # read twice, counted once
    progress.batch_on_model("s000000", ["b.png"])  # the next attempt dies with b alone
    progress.batch_on_model("s000001", ["c.png"])  # another shard's marker is its own
    assert progress.crash_history("s000000") == {"a.png": 0, "b.png": 1}
    assert 0 < redis_client.ttl(progress.key("crashes:s000000")) <= 1000
    progress.forget_crashes("s000000")
    assert progress.crash_history("s000000") == {}
    assert progress.crash_history("s000001") == {"c.png": 1}


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The progress module's clock, moved by the test (``clock[0] += seconds``)."""
    import cutout.jobs.progress as progress_module

    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "time", lambda: now[0])
    return now


def test_rate_and_eta(redis_client, clock):
    progress = LiveProgress(redis_client, "job44")
    progress.set_total(n_items=100, n_shards=10)
    for index in range(5):
        progress.shard_finished(sharding.shard_id_for(index), {"done": 10})
        clock[0] += 2.0
    snap = progress.snapshot()  # 40 items after the first completion, over 10 s
    assert snap.rate_per_s == pytest.approx(4.0)
    assert snap.eta_s == pytest.approx(50 / 4.0)


def test_rebuild_after_redis_loss(redis_client, tmp_path):
    prefix = sharding.job_prefix(str(tmp_path), "0000000000000045")
    _write_shards(prefix, 4)
    manifest.save_totals(prefix, n_items=8, n_shards=4)
    progress = LiveProgress(redis_client, "job45")
    progress.set_total(8, 4)
    for shard_id in ("s000000", "s000002"):
        stats = _finish(prefix, shard_id, [_record(shard_id, 0), _record(shard_id, 1, "failed", "x")])
        progress.shard_finished(shard_id, stats.counts)
    before = progress.snapshot()
    redis_client.flushall()
    assert progress.snapshot().processed == 0
    assert progress.rebuild_from_durable(prefix) == 2
    after = progress.snapshot()
    assert (after.counts, after.shards_done, after.total, after.shards_total) == (
        before.counts, before.shards_done, before.total, before.shards_total)
    assert progress.rebuild_from_durable(prefix) == 0  # idempotent
    assert progress.snapshot().counts == {"done": 2, "failed": 2}


def test_items_move_the_counters_before_the_shard_ends_and_fold_once(redis_client):
    progress = LiveProgress(redis_client, "job46")
    progress.set_total(n_items=6, n_shards=2)
    progress.shard_started("s000000", "w1")
    first = [_record("s000000", 0), _record("s000000", 1, "failed", "bad")]
    progress.items_finished("s000000", first)
    snap = progress.snapshot()
    assert snap.counts == {"done": 1, "failed": 1} and snap.shards_done == 0 and snap.in_flight == 1
    assert snap.tally.error_classes == {"TruncatedImageError": 1}
    assert snap.tally.stage_seconds == {"decode": pytest.approx(0.01)}
    progress.shard_started("s000000", "w2")  # redelivered: the dead attempt's live counts go
    assert progress.snapshot().counts == {}
    records = first + [_record("s000000", 2)]
    progress.items_finished("s000000", records)
    assert progress.shard_finished("s000000", records) is True
    assert progress.shard_finished("s000000", records) is False  # a late duplicate adds nothing
    snap = progress.snapshot()
    assert snap.counts == {"done": 2, "failed": 1} and (snap.shards_done, snap.in_flight) == (1, 0)
    assert progress.done_in_range(0, 1) == 1 and progress.done_in_range(1, 1) == 0


def test_an_ended_job_keeps_its_own_rate_and_a_cancelled_one_has_no_eta(redis_client, clock):
    progress = LiveProgress(redis_client, "job47")
    progress.set_total(n_items=40, n_shards=4)
    for index in range(4):
        clock[0] += 2.0
        progress.shard_finished(sharding.shard_id_for(index), {"done": 10})
    clock[0] += 3600  # an hour after the end
    snap = progress.snapshot()
    assert snap.finished and snap.rate_per_s == pytest.approx(40 / 6.0) and snap.eta_s == 0.0

    other = LiveProgress(redis_client, "job48")
    other.set_total(n_items=40, n_shards=4)
    other.shard_finished("s000000", {"done": 10})
    clock[0] += 2.0
    other.shard_finished("s000001", {"done": 10})
    other.cancel()
    clock[0] += 600
    snap = other.snapshot()
    assert snap.cancelled and snap.eta_s is None and snap.rate_per_s == pytest.approx(20 / 2.0)


def test_an_idle_live_worker_is_counted_alive(redis_client):
    from cutout.jobs.progress import worker_seen

    progress = LiveProgress(redis_client, "job49")
    progress.set_total(n_items=4, n_shards=1)
    assert progress.snapshot().workers_alive == 0
    worker_seen(redis_client, "idle-worker")  # its liveness loop, with no shard to run
    assert progress.snapshot().workers_alive == 1
