"""The durable record of a job, kept beside its outputs: the source of truth (Redis may be lost).

Layout under ``job_prefix`` (= ``DEST/_cutout/jobs/<job_id>``)::

    spec.json                the JobSpec
    totals.json              number of inputs and shards, written by submit
    shards/<shard>.jsonl     inputs of each shard (cutout.jobs.sharding)
    records/<shard>.jsonl    one ItemRecord per input
    stats/<shard>.json       ShardStats, written after the records: the shard's done-marker
    manifest.jsonl|parquet   every record in shard order, assembled at the end

A shard is done exactly when its stats file exists; records without stats (a worker died
between the two writes) count as not done, and the shard runs again.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from cutout.jobs import storage
from cutout.jobs.errors import InvalidIdError, NotFoundError
from cutout.jobs.layout import SHARD_ID, JobLayout
from cutout.jobs.records import ItemRecord, ShardStats
from cutout.jobs.sharding import shard_index
from cutout.jobs.spec import JobSpec

TOP_ERRORS_LIMIT = 20
READ_THREADS = 16  # status and report read stats and records in parallel, in shard order
OTHER_MESSAGES = "(other messages)"
T = TypeVar("T")


def _read(uri: str) -> bytes:
    """One durable file, patiently: a report must not fail on one unlucky object."""
    return storage.patiently(lambda: storage.read_bytes(uri))


def _in_order(calls: Iterable[Callable[[], T]], threads: int = READ_THREADS) -> Iterator[T]:
    """Run ``calls`` on a thread pool and yield their results in order; at most a few per
    thread are held at once, so memory does not grow with the number of shards."""
    window = 4 * threads
    with ThreadPoolExecutor(threads, thread_name_prefix="cutout-read") as pool:
        pending: deque = deque()
        for call in calls:
            pending.append(pool.submit(call))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _layout(job_prefix: str) -> JobLayout:
    """Every path below comes from the job's layout (ids checked), never from joined strings."""
    return JobLayout.from_prefix(job_prefix)


# --- spec and totals ----------------------------------------------------------------------------
def save_spec(job_prefix: str, spec: JobSpec) -> None:
    storage.write_bytes(_layout(job_prefix).spec, spec.model_dump_json(indent=2).encode(),
                        content_type="application/json")


def load_spec(job_prefix: str) -> JobSpec:
    """The stored spec; ``NotFoundError`` names the URI when there is no job there."""
    layout = _layout(job_prefix)
    try:
        data = _read(layout.spec)
    except NotFoundError as exc:
        raise NotFoundError(f"no job spec at {layout.spec} (wrong destination or job id?)") from exc
    spec = JobSpec.model_validate_json(data)
    if spec.job_id != layout.job_id:  # a spec copied or forged into another job's folder
        raise InvalidIdError(f"the spec at {layout.spec} is job {spec.job_id}, not {layout.job_id}")
    return spec


def save_totals(job_prefix: str, n_items: int, n_shards: int, *, skipped: dict[str, int] | None = None) -> None:
    """Written by submit once every shard file is written (live progress can be rebuilt from it).
    ``skipped``: source entries the listing passed over (named pipes, symlink loops), by reason."""
    body = json.dumps({"items": n_items, "shards": n_shards, "skipped": skipped or {}}).encode()
    storage.write_bytes(_layout(job_prefix).totals, body, content_type="application/json")


def load_totals(job_prefix: str) -> tuple[int, int] | None:
    """``(items, shards)``, or None when submit has not finished writing shards."""
    try:
        data = json.loads(_read(_layout(job_prefix).totals))
    except NotFoundError:
        return None
    return int(data["items"]), int(data["shards"])


# --- shard results ------------------------------------------------------------------------------
def write_shard_result(job_prefix: str, shard_id: str, records: list[ItemRecord], stats: ShardStats) -> None:
    """Records first, stats last: the stats file is the done-marker."""
    layout = _layout(job_prefix)
    body = "".join(record.model_dump_json() + "\n" for record in records).encode()
    storage.write_bytes(layout.records(shard_id), body, content_type="application/x-ndjson")
    storage.write_bytes(layout.stats(shard_id), stats.model_dump_json().encode(),
                        content_type="application/json")


def shard_done(job_prefix: str, shard_id: str) -> bool:
    return storage.exists(_layout(job_prefix).stats(shard_id))


def read_shard_records(job_prefix: str, shard_id: str) -> list[ItemRecord]:
    """The shard's records, or ``[]`` when it has none yet."""
    try:
        data = _read(_layout(job_prefix).records(shard_id))
    except NotFoundError:
        return []
    return [ItemRecord.model_validate_json(line) for line in data.decode().splitlines() if line.strip()]


def read_shard_stats(job_prefix: str, shard_id: str) -> ShardStats:
    return ShardStats.model_validate_json(_read(_layout(job_prefix).stats(shard_id)))


def _ids_under(job_prefix: str, folder: str, extension: str) -> list[str]:
    ids = []
    listing = _layout(job_prefix).folder(folder) + "/"
    for uri in storage.patiently(lambda: list(storage.list_uris(listing))):
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(extension) and SHARD_ID.fullmatch(name[: -len(extension)]):
            ids.append(name[: -len(extension)])
    return sorted(ids, key=shard_index)


def done_shard_ids(job_prefix: str) -> set[str]:
    return set(_ids_under(job_prefix, "stats", ".json"))


def all_shard_ids(job_prefix: str) -> list[str]:
    """Every shard the job has, in shard order."""
    return _ids_under(job_prefix, "shards", ".jsonl")


def iter_shard_stats(job_prefix: str) -> Iterator[ShardStats]:
    """Stats of done shards, in shard order, read in parallel."""
    ids = _ids_under(job_prefix, "stats", ".json")
    yield from _in_order(functools.partial(read_shard_stats, job_prefix, shard_id) for shard_id in ids)


def iter_records(job_prefix: str) -> Iterator[ItemRecord]:
    """Records of done shards, in shard order, read in parallel (a bounded window of shards
    in memory)."""
    ids = _ids_under(job_prefix, "stats", ".json")
    for records in _in_order(functools.partial(read_shard_records, job_prefix, shard_id) for shard_id in ids):
        yield from records


# --- the assembled manifest ---------------------------------------------------------------------
def assemble_manifest(job_prefix: str, *, fmt: str = "jsonl") -> str:
    """Write ``manifest.<fmt>`` (records of every done shard, in shard order); returns its URI."""
    uri = _layout(job_prefix).manifest(fmt)
    fd, temp = tempfile.mkstemp(suffix=f".{fmt}")
    os.close(fd)
    try:
        if fmt == "jsonl":
            with open(temp, "w", encoding="utf-8") as handle:
                for record in iter_records(job_prefix):
                    handle.write(record.model_dump_json() + "\n")
            storage.patiently(lambda: storage.upload_file(temp, uri, content_type="application/x-ndjson"))
        else:
            _write_parquet(iter_records(job_prefix), temp)
            storage.patiently(lambda: storage.upload_file(temp, uri, content_type="application/vnd.apache.parquet"))
    finally:
        os.remove(temp)
    return uri


def _parquet_schema():
    import pyarrow as pa

    text, strings = pa.string(), pa.list_(pa.string())
    return pa.schema([
        ("input_uri", text), ("output_uris", strings), ("status", text), ("stage", text),
        ("error_class", text), ("error", text), ("notes", strings),
        ("timings", pa.map_(pa.string(), pa.float64())), ("width", pa.int64()),
        ("height", pa.int64()), ("model", text), ("config_hash", text), ("shard_id", text),
        ("worker", text),
    ])


def _write_parquet(records: Iterator[ItemRecord], path: str, batch_size: int = 10_000) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        from cutout.jobs.errors import ConfigError

        raise ConfigError("a parquet manifest needs pyarrow: pip install 'cutout[parquet]'") from exc
    schema = _parquet_schema()
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict] = []
        for record in records:
            row = record.model_dump()
            row["timings"] = list(row["timings"].items())
            batch.append(row)
            if len(batch) >= batch_size:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


# --- summary ------------------------------------------------------------------------------------
@dataclass
class JobSummary:
    job_prefix: str
    destination: str | None
    shards_done: int
    shards_total: int
    items_total: int | None  # None until submit has written totals.json
    counts: dict[str, int] = field(default_factory=dict)
    error_classes: dict[str, int] = field(default_factory=dict)
    top_errors: dict[str, int] = field(default_factory=dict)
    manifest_uri: str | None = None

    @property
    def items_processed(self) -> int:
        return sum(self.counts.values())

    @property
    def complete(self) -> bool:
        return self.shards_total > 0 and self.shards_done >= self.shards_total


def summarise(job_prefix: str, *, top_errors_limit: int = TOP_ERRORS_LIMIT) -> JobSummary:
    """Counts by status, error classes and the commonest messages, from the stats files only."""
    counts: dict[str, int] = {}
    classes: dict[str, int] = {}
    messages = _MergedCounter(top_errors_limit)
    shards_done = 0
    for stats in iter_shard_stats(job_prefix):
        shards_done += 1
        _add(counts, stats.counts)
        _add(classes, stats.error_classes)
        for message, number in stats.top_errors.items():
            messages.add(message, number)
    totals = load_totals(job_prefix)
    shards_total = totals[1] if totals else len(all_shard_ids(job_prefix))
    try:
        destination = load_spec(job_prefix).destination
    except NotFoundError:
        destination = None
    candidates = (_layout(job_prefix).manifest(f) for f in ("jsonl", "parquet"))
    manifest = next((uri for uri in candidates if storage.patiently(functools.partial(storage.exists, uri))), None)
    return JobSummary(
        job_prefix=job_prefix, destination=destination, shards_done=shards_done,
        shards_total=shards_total, items_total=totals[0] if totals else None, counts=counts,
        error_classes=dict(sorted(classes.items(), key=lambda kv: -kv[1])),
        top_errors=messages.as_dict(), manifest_uri=manifest,
    )


def _add(total: dict[str, int], part: dict[str, int]) -> None:
    for key, number in part.items():
        total[key] = total.get(key, 0) + number


class _MergedCounter:
    """Merges per-shard capped counters, keeping at most ``limit`` distinct messages."""

    def __init__(self, limit: int):
        self.limit, self.counts, self.other = limit, {}, 0

    def add(self, message: str, number: int) -> None:
        if message != OTHER_MESSAGES and (message in self.counts or len(self.counts) < self.limit):
            self.counts[message] = self.counts.get(message, 0) + number
        else:
            self.other += number

    def as_dict(self) -> dict[str, int]:
        data = dict(sorted(self.counts.items(), key=lambda kv: -kv[1]))
        if self.other:
            data[OTHER_MESSAGES] = self.other
        return data
