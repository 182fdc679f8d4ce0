"""The durable record of a job, kept beside its outputs: the source of truth (Redis may be lost).

Layout under ``job_prefix`` (= ``DEST/_cutout/jobs/<job_id>``)::

    spec.json                the JobSpec
    parts.json               shards per manifest part (cutout.jobs.manifest_parts)
    totals.json              number of inputs and shards, list-file columns; written by submit
    shards/<shard>.jsonl     inputs of each shard (cutout.jobs.sharding)
    records/<shard>.jsonl    one ItemRecord per input
    stats/<shard>.json       ShardStats, written after the records: the shard's done-marker
    manifest/part-<g>.parquet  the manifest: every input's latest record, one part per group of
    rollups/<g>.json           shards, each with its roll-up (cutout.jobs.manifest_parts)
    followups/<job>.json     redo jobs (``cutout redo``) whose records replace some of ours
    parent.json              in a redo job: the job it redoes, and which of its shards

A shard is done exactly when its stats file exists; records without stats (a worker died
between the two writes) count as not done, and the shard runs again.
"""
from __future__ import annotations

import functools
import json
import logging
import time
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

log = logging.getLogger(__name__)

TOP_ERRORS_LIMIT = 20
READ_THREADS = 16  # status and report read stats and records in parallel, in shard order
T = TypeVar("T")


def read_durable(uri: str) -> bytes:
    """One durable file, patiently: a report must not fail on one unlucky object."""
    return storage.patiently(lambda: storage.read_bytes(uri))


def in_order(calls: Iterable[Callable[[], T]], threads: int = READ_THREADS) -> Iterator[T]:
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
    """The spec, and how the job's manifest is cut into parts (fixed from now on)."""
    from cutout.jobs.manifest_parts import save_parts_layout

    storage.write_bytes(_layout(job_prefix).spec, spec.model_dump_json(indent=2).encode(),
                        content_type="application/json")
    save_parts_layout(job_prefix, spec.shard_size)


def load_spec(job_prefix: str) -> JobSpec:
    """The stored spec; ``NotFoundError`` names the URI when there is no job there."""
    layout = _layout(job_prefix)
    try:
        data = read_durable(layout.spec)
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
    data = load_totals_full(job_prefix)
    return None if data is None else (data["items"], data["shards"])


def load_totals_full(job_prefix: str) -> dict | None:
    """totals.json with every key (items, shards, skipped, extra_columns), or None."""
    try:
        data = json.loads(read_durable(_layout(job_prefix).totals))
    except NotFoundError:
        return None
    return {"items": int(data["items"]), "shards": int(data["shards"]), "skipped": data.get("skipped") or {},
            "extra_columns": list(data.get("extra_columns") or [])}


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
        data = read_durable(_layout(job_prefix).records(shard_id))
    except NotFoundError:
        return []
    return [ItemRecord.model_validate_json(line) for line in data.decode().splitlines() if line.strip()]


def read_shard_stats(job_prefix: str, shard_id: str) -> ShardStats:
    return ShardStats.model_validate_json(read_durable(_layout(job_prefix).stats(shard_id)))


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
    yield from in_order(functools.partial(read_shard_stats, job_prefix, shard_id) for shard_id in ids)


def iter_records(job_prefix: str) -> Iterator[ItemRecord]:
    """Records of done shards, in shard order, read in parallel (a bounded window of shards
    in memory)."""
    ids = _ids_under(job_prefix, "stats", ".json")
    for records in in_order(functools.partial(read_shard_records, job_prefix, shard_id) for shard_id in ids):
        yield from records


def reopen_shard(job_prefix: str, shard_id: str) -> None:
    """The shard runs again (``retry-failed``): it is not done, and its group's roll-up no
    longer stands (the part stays readable until the group is rebuilt)."""
    from cutout.jobs.manifest_parts import group_of, group_shards

    layout = _layout(job_prefix)
    storage.delete(layout.stats(shard_id))
    storage.delete(layout.rollup(group_of(shard_id, group_shards(job_prefix))))


# --- manifest rows ------------------------------------------------------------------------------
def iter_latest_rows(job_prefix: str, extra_columns: list[str] | None = None, *,
                     with_followups: bool = True) -> Iterator[tuple[str, dict]]:
    """``(shard id in this job, row)`` for every record of a done shard, latest attempt first."""
    job_id = job_id_of(job_prefix)
    newer = followup_rows(job_prefix) if with_followups else {}
    for shard_id in _ids_under(job_prefix, "stats", ".json"):
        for row in shard_rows(job_prefix, shard_id, extra_columns, job_id):
            yield shard_id, newer.get(row["input_uri"], row)


def shard_rows(job_prefix: str, shard_id: str, extra_columns: list[str] | None, job_id: str) -> list[dict]:
    """The shard's records as manifest rows: with ``job_id`` and the list file's columns."""
    extras = _shard_extras(job_prefix, shard_id) if extra_columns else {}
    rows = []
    for record in read_shard_records(job_prefix, shard_id):
        row = record.model_dump(mode="json")
        row["job_id"] = row.get("job_id") or job_id
        for name, value in (extras.get(record.input_uri) or {}).items():
            row[extra_column_name(name)] = value
        rows.append(row)
    return rows


def job_id_of(job_prefix: str) -> str:
    return job_prefix.rstrip("/").rsplit("/", 1)[-1]


# --- redo jobs: follow-ups that replace some records of their parent ------------------------------
def link_followup(parent_prefix: str, child_job_id: str,
                  parent_shards: dict[str, list[str]] | None = None) -> None:
    """Record that job ``child_job_id`` (a sibling of the parent's folder) redoes some inputs;
    ``parent_shards`` (child shard -> the parent's shards its inputs come from) lets a finished
    redo shard refresh only the parent's manifest parts it touches."""
    body = json.dumps({"job_id": child_job_id, "created_at": time.time()}).encode()
    layout = _layout(parent_prefix)
    storage.write_bytes(layout.followup(child_job_id), body, content_type="application/json")
    parent = json.dumps({"job_id": layout.job_id, "parent_shards": parent_shards}).encode()
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


def parent_shards_of(job_prefix: str) -> dict[str, list[str]] | None:
    """In a redo job: its shard -> the parent's shards, or None when not recorded."""
    try:
        data = json.loads(read_durable(_layout(job_prefix).parent))
    except NotFoundError:
        return None
    return data.get("parent_shards")


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


def parquet_schema(extra_columns: list[str] | None = None):
    import pyarrow as pa

    text, strings = pa.string(), pa.list_(pa.string())
    return pa.schema([
        ("input_uri", text), ("output_uris", strings), ("status", text), ("stage", text),
        ("error_class", text), ("error", text), ("notes", strings),
        ("timings", pa.map_(pa.string(), pa.float64())), ("width", pa.int64()),
        ("height", pa.int64()), ("model", text), ("config_hash", text), ("shard_id", text),
        ("worker", text), ("job_id", text), ("quality", pa.map_(pa.string(), pa.float64())),
        ("flags", strings),
    ] + [(extra_column_name(name), _extra_type(name)) for name in extra_columns or ()])


# Columns a box hint adds, kept typed (a box is four numbers to a query); the ids a COCO
# annotation adds stay text like any list-file column (datasets do not all use integers).
TYPED_EXTRAS = {"box": "boxes", "box_index": "id"}


def _extra_type(name: str):
    """Typed for box hints; other list-file columns are text (list files mix types)."""
    import pyarrow as pa

    kind = TYPED_EXTRAS.get(name)
    return pa.list_(pa.float64()) if kind == "boxes" else pa.int64() if kind == "id" else pa.string()


def parquet_row(row: dict, extra_names: list[str]) -> dict:
    """Maps as pairs; extra columns as text (JSON for non-strings), box hints as they are."""
    row["timings"] = list(row["timings"].items())
    row["quality"] = list(row.get("quality", {}).items())
    for name in extra_names:
        value = row.get(name)
        if name in TYPED_EXTRAS:
            continue
        if value is not None and not isinstance(value, str):
            row[name] = json.dumps(value, ensure_ascii=False, default=str)
    return row


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
    manifest_uri: str | None = None  # the folder of Parquet parts, once one is written
    flag_counts: dict[str, int] = field(default_factory=dict)  # quality flags of done outputs
    stage_seconds: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # source entries the listing passed over
    groups_total: int = 0
    groups_current: int = 0  # groups whose part and roll-up are written and current
    uncounted_shards: int = 0  # done shards whose counts were not read (a partial summary)

    @property
    def items_processed(self) -> int:
        return sum(self.counts.values())

    @property
    def complete(self) -> bool:
        return self.shards_total > 0 and self.shards_done >= self.shards_total


def summarise(job_prefix: str, *, top_errors_limit: int = TOP_ERRORS_LIMIT, build: bool = False,
              read_limit: int | None = None, state=None) -> JobSummary:
    """Counts, failures and flags from the group roll-ups and one listing of done-markers.

    Done shards of groups without a current roll-up (still running, or just retried) are read
    one by one, at most ``read_limit`` of them (default: 10 + shards/100); beyond that the
    summary says how many it left out. ``build`` first writes the parts of groups that are
    done but have none (a lost build task): what `report` and `manifest` do. ``state``: the
    groups as the caller already read them (``manifest_parts.groups_state``).
    """
    from cutout.jobs import manifest_parts
    from cutout.jobs.rollup import Tally

    state = state or manifest_parts.groups_state(job_prefix)
    if build:
        manifest_parts.build_missing(job_prefix, state)
    current = [r for g, r in sorted(state.rollups.items()) if state.current(g)]
    fields: dict[str, float] = {}
    for rollup in current:
        _add(fields, rollup["fields"])
    outside = state.shards_outside_current()
    limit = 10 + state.shards_total // 100 if read_limit is None else read_limit
    messages = [rollup["top_errors"] for rollup in current]
    for stats in in_order(functools.partial(read_shard_stats, job_prefix, s) for s in outside[:limit]):
        _add(fields, _stats_fields(stats))
        messages.append(stats.top_errors)
    tally = Tally.from_fields(fields)
    totals = state.totals
    layout = _layout(job_prefix)
    return JobSummary(
        job_prefix=job_prefix, destination=layout.destination, shards_done=len(state.done),
        shards_total=state.shards_total, items_total=totals.get("items"), counts=tally.counts,
        error_classes=tally.error_classes,
        top_errors=manifest_parts.merged_top_errors([{"top_errors": m} for m in messages], top_errors_limit),
        manifest_uri=layout.folder("manifest") + "/" if current else None, flag_counts=tally.flag_counts,
        stage_seconds=tally.stage_seconds, skipped=totals.get("skipped") or {},
        groups_total=manifest_parts.groups_total(state.shards_total, state.per_group),
        groups_current=len(current), uncounted_shards=max(0, len(outside) - limit),
    )


def summarise_full(job_prefix: str, *, top_errors_limit: int = TOP_ERRORS_LIMIT) -> JobSummary:
    """Every shard's stats file read (``status --verify``): slow at size, needs nothing else."""
    from cutout.jobs import manifest_parts
    from cutout.jobs.rollup import Tally

    fields: dict[str, float] = {}
    messages = []
    shards_done = 0
    for stats in iter_shard_stats(job_prefix):
        shards_done += 1
        _add(fields, _stats_fields(stats))
        messages.append({"top_errors": stats.top_errors})
    tally = Tally.from_fields(fields)
    totals = load_totals_full(job_prefix) or {}
    shards_total = totals["shards"] if totals else len(all_shard_ids(job_prefix))
    return JobSummary(
        job_prefix=job_prefix, destination=_layout(job_prefix).destination, shards_done=shards_done,
        shards_total=shards_total, items_total=totals.get("items"), counts=tally.counts,
        error_classes=tally.error_classes,
        top_errors=manifest_parts.merged_top_errors(messages, top_errors_limit),
        flag_counts=tally.flag_counts, skipped=totals.get("skipped") or {},
    )


def _stats_fields(stats: ShardStats) -> dict[str, float]:
    """A shard's tally fields from its stats file (no stage seconds: those live in records)."""
    fields: dict[str, float] = {f"status:{k}": v for k, v in stats.counts.items()}
    fields.update({f"class:{k}": v for k, v in stats.error_classes.items()})
    fields.update({f"flag:{k}": v for k, v in stats.flag_counts.items()})
    return fields


def _add(total: dict, part: dict) -> None:
    for key, number in part.items():
        total[key] = total.get(key, 0) + number
