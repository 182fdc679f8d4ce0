"""Listing at size, against moto's S3 server: a prefix listed in parallel (the same keys in the
same order as one ListObjectsV2 chain, with the requests fanned out over its folders), and an
S3 Inventory report (CSV and Parquet) as a source."""
from __future__ import annotations

import csv
import gzip
import io
import json
import threading

import pytest

from cutout.jobs import storage
from cutout.jobs.errors import ConfigError
from cutout.jobs.sources import SourceItem, iter_source_items
from tests.faultproxy import FaultProxy


class ListCalls:
    """Counts the ListObjectsV2 requests boto3 really sends, and how many were in flight at once."""

    def __init__(self, client):
        self.client, self.calls, self.in_flight, self.most_in_flight = client, [], 0, 0
        self._lock = threading.Lock()

    def __enter__(self):
        self.client.meta.events.register("before-call.s3.ListObjectsV2", self._before)
        self.client.meta.events.register("after-call.s3.ListObjectsV2", self._after)
        return self

    def __exit__(self, *exc):
        self.client.meta.events.unregister("before-call.s3.ListObjectsV2", self._before)
        self.client.meta.events.unregister("after-call.s3.ListObjectsV2", self._after)

    def _before(self, params, **_):
        with self._lock:
            self.calls.append(params.get("Prefix"))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def _after(self, **_):
        with self._lock:
            self.in_flight -= 1


@pytest.fixture
def slow_s3(s3_server, monkeypatch):
    """moto behind 20 ms of latency per request, like a far-away object store."""
    with FaultProxy(upstream=s3_server.endpoint, latency_s=0.02) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


def test_a_prefix_is_listed_in_parallel_in_the_flat_listing_order(bucket, slow_s3):
    name = bucket()
    client = storage.s3_client()
    keys = [f"in/{folder:02d}/{i:03d}.jpg" for folder in range(24) for i in range(5)]
    keys += ["in/05.jpg", "in/05/deep/er/x.jpg", "in/a b/ü.png", "in/zz.png", "in/marker/", "outside/x.jpg"]
    for key in keys:
        client.put_object(Bucket=name, Key=key, Body=b"")
    flat = list(storage.list_uris(f"s3://{name}/in/"))
    with ListCalls(client) as listing:
        tree = list(storage.list_tree(f"s3://{name}/in/"))
    assert tree == flat  # same keys, same order ("in/05.jpg" before "in/05/...", markers left out)
    assert len(tree) == len(keys) - 2
    assert len(listing.calls) >= 26  # one per folder: the listing fanned out
    assert listing.most_in_flight > 1  # ... and the folders were listed concurrently
    items = list(iter_source_items([f"s3://{name}/in/"]))
    assert items[0] == SourceItem(f"s3://{name}/in/00/000.jpg", "00/000.jpg")
    assert [item.uri for item in items] == [uri for uri in flat]


def _put(name: str, key: str, body: bytes) -> None:
    storage.s3_client().put_object(Bucket=name, Key=key, Body=body)


def _csv_gz(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text, quoting=csv.QUOTE_ALL).writerows(rows)
    return gzip.compress(text.getvalue().encode())


def test_an_s3_inventory_report_in_csv_is_a_source(bucket):
    source, inventory = bucket("photos"), bucket("inv")
    base = f"inv/{source}/daily"
    schema = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size"
    files = [
        _csv_gz([[source, "a/cat+1.jpg", "v1", "true", "false", "10"],
                 [source, "a/old.jpg", "v0", "false", "false", "10"],  # an older version
                 [source, "a/gone.jpg", "v2", "true", "true", ""],  # a delete marker
                 [source, "notes.txt", "v1", "true", "false", "3"]]),
        _csv_gz([[source, "b/dog%20%C3%BC.png", "v1", "true", "false", "10"]]),
    ]
    for index, data in enumerate(files):
        _put(inventory, f"{base}/data/part-{index}.csv.gz", data)
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{inventory}",
                "version": "2016-11-30", "fileFormat": "CSV", "fileSchema": schema,
                "files": [{"key": f"{base}/data/part-{index}.csv.gz", "size": len(data), "MD5checksum": "x"}
                          for index, data in enumerate(files)]}
    _put(inventory, f"{base}/2026-12-01T00-00Z/manifest.json", json.dumps(manifest).encode())
    items = list(iter_source_items([f"s3://{inventory}/{base}/2026-12-01T00-00Z/manifest.json"]))
    assert items == [SourceItem(f"s3://{source}/a/cat 1.jpg", "a/cat 1.jpg"),
                     SourceItem(f"s3://{source}/b/dog ü.png", "b/dog ü.png")]


def test_an_s3_inventory_report_in_parquet_is_submitted_as_a_job(bucket, redis_client, redis_url):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cutout.jobs import sharding
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_job

    source, inventory = bucket("photos"), bucket("inv")
    table = pa.table({"bucket": [source] * 5, "key": [f"p/{i}.jpg" for i in range(5)],
                      "is_latest": [True, True, False, True, True],
                      "is_delete_marker": [False, False, False, True, False]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _put(inventory, "data/one.parquet", buffer.getvalue())
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{inventory}", "fileFormat": "Parquet",
                "fileSchema": "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); }",
                "files": [{"key": "data/one.parquet", "size": 1, "MD5checksum": "x"}]}
    _put(inventory, "report/manifest.json", json.dumps(manifest).encode())
    spec = JobSpec(sources=(f"s3://{inventory}/report/manifest.json",), destination=f"s3://{source}/out",
                   pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=2)
    result = submit_job(spec, broker_url=redis_url, redis_url=redis_url)
    assert (result.items_total, result.shards_total) == (3, 2)
    shard = sharding.read_shard(result.job_prefix, "s000000")
    assert [(i.uri, i.output_uri) for i in shard.items] == [
        (f"s3://{source}/p/0.jpg", f"s3://{source}/out/p/0.png"), (f"s3://{source}/p/1.jpg", f"s3://{source}/out/p/1.png")]


def test_an_orc_inventory_or_a_missing_data_file_is_a_config_error(bucket):
    inventory = bucket("inv")
    _put(inventory, "orc/manifest.json", json.dumps({"fileFormat": "ORC", "files": []}).encode())
    with pytest.raises(ConfigError, match="ORC"):
        list(iter_source_items([f"s3://{inventory}/orc/manifest.json"]))
    _put(inventory, "lost/manifest.json", json.dumps(
        {"fileFormat": "CSV", "fileSchema": "Bucket, Key", "files": [{"key": "data/nope.csv.gz"}]}).encode())
    with pytest.raises(ConfigError, match="missing"):
        list(iter_source_items([f"s3://{inventory}/lost/manifest.json"]))
