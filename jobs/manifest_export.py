"""``cutout manifest JOB --format jsonl|csv|parquet --out PATH``: the parts as one file, on demand.

Run by the user, never by a worker: parts are read a few at a time in parallel and written in
part order (so in shard order), streaming; memory holds a bounded window of parts, never the
whole manifest. Done groups without a part (a lost build task) are built first, here.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass
from typing import IO

from cutout.jobs import manifest, manifest_parts


@dataclass
class ExportResult:
    rows: int
    parts: int
    groups_missing: int  # groups with shards still to finish: their rows are not in the file


def export_manifest(job_prefix: str, fmt: str, out_path: str, *, threads: int = 8) -> ExportResult:
    if fmt not in ("jsonl", "csv", "parquet"):
        raise ValueError(f"manifest format must be jsonl, csv or parquet, not {fmt!r}")
    state = manifest_parts.groups_state(job_prefix)
    manifest_parts.build_missing(job_prefix, state)
    groups = manifest_parts.part_groups(job_prefix)
    columns = (manifest.load_totals_full(job_prefix) or {}).get("extra_columns", [])
    schema = manifest.parquet_schema(columns)
    reads = (lambda group=group: manifest_parts.read_part(job_prefix, group) for group in groups)
    tables = (table for table in manifest.in_order(reads, threads=max(1, threads)) if table is not None)
    writer = {"jsonl": _write_jsonl, "csv": _write_csv, "parquet": _write_parquet}[fmt]
    rows = _to_file(out_path, fmt, lambda handle: writer(handle, tables, schema))
    groups_total = manifest_parts.groups_total(state.shards_total, state.per_group)
    missing = sum(1 for group in range(groups_total) if not state.current(group))
    return ExportResult(rows, len(groups), missing)


def _to_file(out_path: str, fmt: str, write) -> int:
    """Write through a temp file renamed at the end (stdout for ``-``)."""
    if out_path == "-":
        if fmt == "parquet":
            return write(sys.stdout.buffer)
        return write(sys.stdout)
    temp = f"{out_path}.partial"
    mode = "wb" if fmt == "parquet" else "w"
    with open(temp, mode, **({} if fmt == "parquet" else {"encoding": "utf-8", "newline": ""})) as handle:
        rows = write(handle)
    os.replace(temp, out_path)
    return rows


def _write_jsonl(handle: IO[str], tables, schema) -> int:
    rows = 0
    for table in tables:
        for batch in table.to_batches(10_000):
            for row in batch.to_pylist():
                handle.write(json.dumps(manifest_parts.plain_row(row), ensure_ascii=False, default=str) + "\n")
                rows += 1
    return rows


def _write_csv(handle: IO[str], tables, schema) -> int:
    """One column per field; lists and maps as JSON text."""
    writer = csv.writer(handle)
    writer.writerow(schema.names)
    rows = 0
    for table in tables:
        for batch in table.to_batches(10_000):
            for row in batch.to_pylist():
                row = manifest_parts.plain_row(row)
                writer.writerow([_cell(row.get(name)) for name in schema.names])
                rows += 1
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _write_parquet(handle, tables, schema) -> int:
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(handle, schema) as writer:
        for table in tables:
            writer.write_table(_conform(table, schema))
            rows += table.num_rows
    return rows


def _conform(table, schema):
    """A part written before the job gained a list-file column gets that column as nulls."""
    import pyarrow as pa

    columns = [table.column(name) if name in table.column_names else pa.nulls(table.num_rows, schema.field(name).type)
               for name in schema.names]
    return pa.Table.from_arrays(columns, schema=schema)
