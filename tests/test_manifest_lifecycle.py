"""The manifest's lifecycle: assembled when the last shard finishes (race-safe), refreshed after a
redo, in both formats, with a ``job_id`` column and the extra columns of a list file."""
from __future__ import annotations

import csv
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cutout.jobs import manifest, sharding, storage
from cutout.jobs.progress import LiveProgress
from cutout.jobs.records import ItemRecord, ShardStats
from cutout.jobs.sources import iter_source_items


@pytest.fixture(params=["local", "s3"])
def job_prefix(request, tmp_path):
    dest = str(tmp_path / "dest") if request.param == "local" else f"s3://{request.getfixturevalue('bucket')()}/dest"
    return sharding.job_prefix(dest, "0123456789abcdef")


def _finish(prefix: str, shard_id: str, n: int = 2, status: str = "done", flags=()) -> None:
    records = [ItemRecord(input_uri=f"s3://in/{shard_id}/{i}.jpg", status=status, shard_id=shard_id,
                          flags=list(flags), quality={"alpha_coverage": 0.5}) for i in range(n)]
    stats = ShardStats(job_id="0123456789abcdef", shard_id=shard_id, counts={status: n},
                       started_at=time.time() - 1, finished_at=time.time())
    manifest.write_shard_result(prefix, shard_id, records, stats)


def _rows(uri: str) -> list[dict]:
    if uri.endswith(".jsonl"):
        return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def test_assembled_in_both_formats_only_when_the_last_shard_is_done(job_prefix):
    manifest.save_totals(job_prefix, 6, 3)
    _finish(job_prefix, "s000000")
    _finish(job_prefix, "s000001")
    assert manifest.assemble_if_complete(job_prefix) == []
    assert not storage.exists(storage.join_uri(job_prefix, "manifest.jsonl"))
    _finish(job_prefix, "s000002", flags=["empty_alpha"])
    uris = manifest.assemble_if_complete(job_prefix)
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["manifest.jsonl", "manifest.parquet"]
    for uri in uris:
        rows = _rows(uri)
        assert [r["input_uri"] for r in rows] == [f"s3://in/s00000{s}/{i}.jpg" for s in range(3) for i in range(2)]
        assert {r["job_id"] for r in rows} == {"0123456789abcdef"}
        assert list(rows[-1]["flags"]) == ["empty_alpha"]


def test_no_totals_means_not_complete(tmp_path):
    prefix = sharding.job_prefix(str(tmp_path / "out"), "0123456789abcdef")
    _finish(prefix, "s000000")  # submit has not finished writing shards: never assemble
    assert manifest.assemble_if_complete(prefix) == []


def test_live_progress_saying_not_done_skips_the_listing(tmp_path, redis_client):
    prefix = sharding.job_prefix(str(tmp_path / "out"), "0123456789abcdef")
    manifest.save_totals(prefix, 2, 1)
    _finish(prefix, "s000000")
    progress = LiveProgress(redis_client, "0123456789abcdef")
    progress.set_total(2, 2)  # live view: one of two shards counted, none yet
    assert manifest.assemble_if_complete(prefix, progress=progress) == []
    progress.set_total(2, 1)
    progress.shard_finished("s000000", {"done": 2})
    assert len(manifest.assemble_if_complete(prefix, progress=progress)) == 2


def test_two_workers_finishing_together_both_leave_a_whole_manifest(job_prefix):
    manifest.save_totals(job_prefix, 40, 20)
    for index in range(18):
        _finish(job_prefix, sharding.shard_id_for(index))
    results: list[list[str]] = []
    barrier = threading.Barrier(2)

    def last_shard(index: int) -> None:
        _finish(job_prefix, sharding.shard_id_for(index))
        barrier.wait()
        results.append(manifest.assemble_if_complete(job_prefix))

    threads = [threading.Thread(target=last_shard, args=(i,)) for i in (18, 19)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert any(results), "neither finisher assembled the manifest"
    for fmt in ("jsonl", "parquet"):
        rows = _rows(storage.join_uri(job_prefix, f"manifest.{fmt}"))
        inputs = [r["input_uri"] for r in rows]
        assert len(inputs) == 40 == len(set(inputs))


def test_refreshed_after_a_redo(tmp_path):
    prefix = sharding.job_prefix(str(tmp_path / "out"), "0123456789abcdef")
    manifest.save_totals(prefix, 2, 1)
    _finish(prefix, "s000000", status="failed")
    manifest.assemble_if_complete(prefix)
    storage.delete(storage.join_uri(prefix, "stats", "s000000.json"))  # retry-failed does this
    assert manifest.assemble_if_complete(prefix) == []
    _finish(prefix, "s000000", status="done")
    for uri in manifest.assemble_if_complete(prefix):
        assert {r["status"] for r in _rows(uri)} == {"done"}, uri


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
    uris = manifest.assemble_if_complete(prefix)
    assert len(uris) == 2
    for uri in uris:
        by_name = {r["input_uri"].rsplit("/", 1)[-1]: r for r in _rows(uri)}
        assert by_name["img1.png"]["caption"] == "a square 1"
        assert by_name["img1.png"]["extra_status"] == "s1"  # a record field keeps its meaning
        assert by_name["img1.png"]["status"] == "done"
        assert by_name["missing.png"]["status"] == "failed"
        assert by_name["missing.png"]["caption"] == "gone"
        assert by_name["img0.png"]["job_id"] == spec.job_id
