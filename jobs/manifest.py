"""The durable record of a job, kept beside its outputs: the source of truth (Redis may be lost).

Layout under ``job_prefix`` (= ``DEST/_cutout/jobs/<job_id>``)::

    spec.json                the JobSpec
    totals.json              number of inputs and shards, written by submit
    shards/<shard>.jsonl     inputs of each shard (cutout.jobs.sharding)
    records/<shard>.jsonl    one ItemRecord per input
    stats/<shard>.json       ShardStats, written after the records: the shard's done-marker
    manifest.jsonl|parquet   every record in shard order, with a ``job_id`` column and the extra
                             columns of list-file sources; assembled by the worker that
                             finishes the last shard (``assemble_if_complete``), again after
                             a retry or an incremental submit, and by ``report``
    followups/<job>.json     redo jobs (``cutout redo``) whose records replace some of ours
    parent.json              in a redo job: the job it redoes

A shard is done exactly when its stats file exists; records without stats (a worker died
between the two writes) count as not done, and the shard runs again.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from cutout.jobs import storage
from cutout.jobs.errors import CutoutError, InvalidIdError, NotFoundError
from cutout.jobs.layout import SHARD_ID, JobLayout
from cutout.jobs.records import ItemRecord, ShardStats
from cutout.jobs.sharding import shard_index
from cutout.jobs.spec import JobSpec

log = logging.getLogger(__name__)

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


def save_totals(job_prefix: str, n_items: int, n_shards: int, *, skipped: dict[str, int] | None = None,
                extra_columns: list[str] | None = None) -> None:
    """Written by submit once every shard file is written (live progress can be rebuilt from it).

    ``skipped``: source entries the listing passed over (named pipes, symlink loops), by reason.
    ``extra_columns`` names the list-file columns the shard files carry, so the manifest reads
    shard files beside the records only for jobs that have some.
    """
    body = json.dumps({"items": n_items, "shards": n_shards, "skipped": skipped or {},
                       "extra_columns": extra_columns or []}).encode()
    storage.write_bytes(_layout(job_prefix).totals, body, content_type="application/json")


def load_totals(job_prefix: str) -> tuple[int, int] | None:
    """``(items, shards)``, or None when submit has not finished writing shards."""
    try:
        data = json.loads(_read(_layout(job_prefix).totals))
    except NotFoundError:
        return None
    return int(data["items"]), int(data["shards"])


def load_extra_columns(job_prefix: str) -> list[str]:
    try:
        return list(json.loads(storage.read_bytes(_layout(job_prefix).totals)).get("extra_columns", []))
    except NotFoundError:
        return []


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
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"manifest format must be jsonl or parquet, not {fmt!r}")
    uri = _layout(job_prefix).manifest(fmt)
    extra_columns = load_extra_columns(job_prefix)
    fd, temp = tempfile.mkstemp(suffix=f".{fmt}")
    os.close(fd)
    try:
        if fmt == "jsonl":
            with open(temp, "w", encoding="utf-8") as handle:
                for row in iter_manifest_rows(job_prefix, extra_columns):
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            storage.patiently(lambda: storage.upload_file(temp, uri, content_type="application/x-ndjson"))
        else:
            _write_parquet(iter_manifest_rows(job_prefix, extra_columns), temp, extra_columns)
            storage.patiently(lambda: storage.upload_file(temp, uri, content_type="application/vnd.apache.parquet"))
    finally:
        os.remove(temp)
    return uri


def manifest_formats() -> tuple[str, ...]:
    """The formats a manifest is kept in: JSONL always, Parquet too when pyarrow is installed."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return ("jsonl",)
    return ("jsonl", "parquet")


def assemble_if_complete(job_prefix: str, *, progress=None) -> list[str]:
    """Assemble the manifest in every format once every shard is done; the URIs written, or [].

    Called by a worker after each shard it finishes. Race-safe: a worker checks after its own
    stats write, so the last of two finishing together always sees the job complete; when
    both do, both write the same content atomically. Live progress (when given) answers
    "not yet" cheaply, so only the last shards list the stats files. A failure is logged, never
    raised: the shard is done, and ``cutout report`` assembles the manifest too.
    """
    try:
        if progress is not None and not _live_may_be_complete(progress):
            return []
        if not _all_shards_done(job_prefix):
            return []
        written = [assemble_manifest(job_prefix, fmt=fmt) for fmt in manifest_formats()]
        parent = parent_prefix_of(job_prefix)  # a finished redo refreshes its parent's manifest
        if parent is not None and _all_shards_done(parent):
            written += [assemble_manifest(parent, fmt=fmt) for fmt in manifest_formats()]
        return written
    except CutoutError as exc:
        log.warning("manifest of %s not assembled (report will): %s: %s", job_prefix, exc.error_class, exc)
        return []


def _all_shards_done(job_prefix: str) -> bool:
    totals = load_totals(job_prefix)
    return totals is not None and len(done_shard_ids(job_prefix)) >= totals[1]


def _live_may_be_complete(progress) -> bool:
    """False only when live progress knows the job and counts fewer shards done than it has."""
    from redis.exceptions import RedisError

    try:
        snap = progress.snapshot()
    except RedisError:
        return True
    return snap.shards_total == 0 or snap.shards_done >= snap.shards_total


def iter_manifest_rows(job_prefix: str, extra_columns: list[str] | None = None) -> Iterator[dict]:
    """Manifest rows: each input's latest record (a redo job's record replaces the original),
    with its ``job_id`` and its list-file columns, in shard order."""
    for _, row in iter_latest_rows(job_prefix, extra_columns):
        yield row


def iter_latest_rows(job_prefix: str, extra_columns: list[str] | None = None, *,
                     with_followups: bool = True) -> Iterator[tuple[str, dict]]:
    """``(shard id in this job, row)`` for every record of a done shard, latest attempt first."""
    job_id = job_id_of(job_prefix)
    newer = followup_rows(job_prefix) if with_followups else {}
    for shard_id in _ids_under(job_prefix, "stats", ".json"):
        extras = _shard_extras(job_prefix, shard_id) if extra_columns else {}
        for record in read_shard_records(job_prefix, shard_id):
            row = newer.get(record.input_uri)
            if row is None:
                row = record.model_dump(mode="json")
                row["job_id"] = row.get("job_id") or job_id
                for name, value in (extras.get(record.input_uri) or {}).items():
                    row[extra_column_name(name)] = value
            yield shard_id, row


def job_id_of(job_prefix: str) -> str:
    return job_prefix.rstrip("/").rsplit("/", 1)[-1]


# --- redo jobs: follow-ups that replace some records of their parent ------------------------------
def link_followup(parent_prefix: str, child_job_id: str) -> None:
    """Record that job ``child_job_id`` (a sibling of the parent's folder) redoes some inputs."""
    body = json.dumps({"job_id": child_job_id, "created_at": time.time()}).encode()
    layout = _layout(parent_prefix)
    storage.write_bytes(layout.followup(child_job_id), body, content_type="application/json")
    parent = json.dumps({"job_id": layout.job_id}).encode()
    storage.write_bytes(layout.sibling(child_job_id).parent, parent, content_type="application/json")


def followup_prefixes(parent_prefix: str) -> list[str]:
    """Redo jobs of this job, oldest first (a later redo of an input wins)."""
    found = []
    for uri in storage.list_uris(_layout(parent_prefix).folder("followups") + "/"):
        if uri.endswith(".json"):
            data = json.loads(storage.read_bytes(uri))
            found.append((data.get("created_at", 0.0), _sibling(parent_prefix, data["job_id"])))
    return [prefix for _, prefix in sorted(found)]


def followup_rows(parent_prefix: str) -> dict[str, dict]:
    """The latest row per input across the done shards of every redo job."""
    rows: dict[str, dict] = {}
    for prefix in followup_prefixes(parent_prefix):
        columns = load_extra_columns(prefix)
        for _, row in iter_latest_rows(prefix, columns, with_followups=False):
            rows[row["input_uri"]] = row
    return rows


def parent_prefix_of(job_prefix: str) -> str | None:
    try:
        data = json.loads(storage.read_bytes(_layout(job_prefix).parent))
    except NotFoundError:
        return None
    return _sibling(job_prefix, data["job_id"])


def _sibling(job_prefix: str, job_id: str) -> str:
    """The prefix of another job of the same destination (its id checked: it comes from a file)."""
    return _layout(job_prefix).sibling(job_id).prefix


def extra_column_name(name: str) -> str:
    """A list-file column keeps its name unless a record field has it (then ``extra_<name>``)."""
    return f"extra_{name}" if name in ItemRecord.model_fields else name


def _shard_extras(job_prefix: str, shard_id: str) -> dict[str, dict]:
    from cutout.jobs.sharding import read_shard

    return {item.uri: item.extra for item in read_shard(job_prefix, shard_id).items if item.extra}


def _parquet_schema(extra_columns: list[str] | None = None):
    import pyarrow as pa

    text, strings = pa.string(), pa.list_(pa.string())
    return pa.schema([
        ("input_uri", text), ("output_uris", strings), ("status", text), ("stage", text),
        ("error_class", text), ("error", text), ("notes", strings),
        ("timings", pa.map_(pa.string(), pa.float64())), ("width", pa.int64()),
        ("height", pa.int64()), ("model", text), ("config_hash", text), ("shard_id", text),
        ("worker", text), ("job_id", text), ("quality", pa.map_(pa.string(), pa.float64())),
        ("flags", strings),
    ] + [(extra_column_name(name), text) for name in extra_columns or ()])


def _parquet_row(row: dict, extra_names: list[str]) -> dict:
    """Maps as pairs; extra columns as text (JSON for non-strings), since list files mix types."""
    row["timings"] = list(row["timings"].items())
    row["quality"] = list(row.get("quality", {}).items())
    for name in extra_names:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            row[name] = json.dumps(value, ensure_ascii=False, default=str)
    return row


def _write_parquet(rows: Iterator[dict], path: str, extra_columns: list[str] | None = None,
                   batch_size: int = 10_000) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        from cutout.jobs.errors import ConfigError

        raise ConfigError("a parquet manifest needs pyarrow: pip install 'cutout[parquet]'") from exc
    schema = _parquet_schema(extra_columns)
    extra_names = [extra_column_name(name) for name in extra_columns or ()]
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict] = []
        for row in rows:
            batch.append(_parquet_row(row, extra_names))
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
    flag_counts: dict[str, int] = field(default_factory=dict)  # quality flags of done outputs

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
    flags: dict[str, int] = {}
    messages = _MergedCounter(top_errors_limit)
    shards_done = 0
    for stats in iter_shard_stats(job_prefix):
        shards_done += 1
        _add(counts, stats.counts)
        _add(classes, stats.error_classes)
        _add(flags, stats.flag_counts)
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
        flag_counts=dict(sorted(flags.items(), key=lambda kv: -kv[1])),
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
