"""An S3 Inventory report as a source: ``cutout submit s3://inv/.../manifest.json --to DEST``.

A bucket of 10^8 objects takes 100,000 ListObjectsV2 calls to list; its owner often has a daily
S3 Inventory report already. The report's ``manifest.json`` names its data files (``files[].key``,
in the destination bucket), their format (``fileFormat``: ``CSV``, gzipped with no header, or
``Parquet``) and, for CSV, the column order (``fileSchema``: ``"Bucket, Key, VersionId, ..."``).
Keys in CSV files are URL-encoded; Parquet columns are ``bucket``, ``key``, ``is_latest``,
``is_delete_marker``. Delete markers and older versions are passed over.

Inputs come out in the report's order (data files as listed, rows as written), which is fixed
for a given report, so the same report always gives the same shards. The output key of
``s3://bucket/a/b.jpg`` is ``a/b.<ext>``, as for a listing of ``s3://bucket/``. One data file
is read at a time (ORC reports are refused: choose CSV or Parquet in the inventory settings).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import posixpath
import urllib.parse
from typing import Iterator

from cutout.jobs import storage
from cutout.jobs.errors import ConfigError, NotFoundError

MANIFEST_NAME = "manifest.json"


def is_inventory_manifest(source: str) -> bool:
    return source.startswith("s3://") and posixpath.basename(source) == MANIFEST_NAME


def iter_inventory(source: str) -> Iterator[tuple[str, str, str]]:
    """``(uri, bucket, key)`` of every current object the report lists, in report order."""
    manifest = _read_manifest(source)
    fmt = str(manifest.get("fileFormat", "")).lower()
    readers = {"csv": _csv_rows, "parquet": _parquet_rows}
    if fmt not in readers:
        raise ConfigError(f"inventory {source}: fileFormat {manifest.get('fileFormat')!r} is not supported "
                          "(use CSV or Parquet in the inventory configuration)")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and f.get("key") for f in files):
        raise ConfigError(f"inventory {source}: 'files' must list objects with a 'key'")
    location = _data_location(source, manifest)
    for entry in files:
        data_uri = location(entry["key"])
        try:
            data = storage.read_bytes(data_uri)
        except NotFoundError as exc:
            raise ConfigError(f"inventory {source}: data file {data_uri} is missing") from exc
        for bucket, key in readers[fmt](data, manifest, data_uri):
            if key and not key.endswith("/"):
                yield f"s3://{bucket}/{key}", bucket, key


def _read_manifest(source: str) -> dict:
    try:
        manifest = json.loads(storage.read_bytes(source))
    except NotFoundError as exc:
        raise ConfigError(f"inventory manifest {source!r} does not exist") from exc
    except ValueError as exc:
        raise ConfigError(f"inventory manifest {source}: not JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ConfigError(f"inventory manifest {source}: expected a JSON object")
    return manifest


def _data_location(source: str, manifest: dict):
    """Data file keys are keys of the report's destination bucket (``arn:aws:s3:::name``)."""
    bucket = str(manifest.get("destinationBucket") or "").rsplit(":", 1)[-1] or storage._split_s3(source)[0]
    return lambda key: f"s3://{bucket}/{key}"


def _csv_rows(data: bytes, manifest: dict, uri: str) -> Iterator[tuple[str, str]]:
    columns = [name.strip().lower() for name in str(manifest.get("fileSchema", "Bucket, Key")).split(",")]
    if "bucket" not in columns or "key" not in columns:
        raise ConfigError(f"inventory {uri}: fileSchema has no Bucket and Key columns")
    at = {name: columns.index(name) for name in ("bucket", "key", "islatest", "isdeletemarker") if name in columns}
    text = io.TextIOWrapper(gzip.GzipFile(fileobj=io.BytesIO(data)) if uri.endswith(".gz") else io.BytesIO(data),
                            encoding="utf-8", newline="")
    for row in csv.reader(text):
        if len(row) <= max(at.values()) or not _current(row, at):
            continue
        yield row[at["bucket"]], urllib.parse.unquote_plus(row[at["key"]])


def _current(row: list[str], at: dict[str, int]) -> bool:
    """Not a delete marker, and the latest version (columns present only for versioned reports)."""
    if "isdeletemarker" in at and row[at["isdeletemarker"]].strip().lower() == "true":
        return False
    return not ("islatest" in at and row[at["islatest"]].strip().lower() == "false")


def _parquet_rows(data: bytes, manifest: dict, uri: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(pa.BufferReader(data))
    names = set(parquet.schema_arrow.names)
    if not {"bucket", "key"} <= names:
        raise ConfigError(f"inventory {uri}: no bucket and key columns (columns: {', '.join(sorted(names))})")
    wanted = [name for name in ("bucket", "key", "is_latest", "is_delete_marker") if name in names]
    for batch in parquet.iter_batches(batch_size=65536, columns=wanted):
        for row in batch.to_pylist():
            if row.get("is_delete_marker") or row.get("is_latest") is False:
                continue
            yield row["bucket"], row["key"]
