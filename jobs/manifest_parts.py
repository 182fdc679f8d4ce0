"""The manifest as a partitioned Parquet dataset: one part and one roll-up per group of shards.

Why parts: a job of 10^8 inputs has a manifest of about 100 GB. Built as one file it would be
assembled by one process reading every record, hours after the last shard. Cut by groups of
consecutive shards, each part is written as soon as its group's last shard finishes, by a task
that reads only that group; the folder of parts is the dataset (``pyarrow.dataset`` or duckdb's
``read_parquet('…/manifest/*.parquet')`` read it in one call).

Layout under the job (``cutout.jobs.layout``)::

    parts.json                       {"group_shards": G}: fixed when the job is made
    manifest/part-<group>.parquet    the latest record of every input of shards [g*G, (g+1)*G)
    rollups/<group>.json             the group's tallies (cutout.jobs.rollup), top errors, and the
                                     shards it covers with their run times; written after the part

A group has at most 1000 shards and about 10^6 rows (``group_shards_for``). A part is rewritten
only when its group changes: a retried shard (``reopen_shard`` drops the roll-up), new shards of
an incremental submit (the roll-up no longer covers the group), a redo (each redo job names the
shards of its parent it replaces; the parent's groups are rebuilt with the redo's rows).
Writes are atomic (temp file and rename locally, one PUT on S3): a reader sees the old part or
the new one.
"""
from __future__ import annotations

import functools
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from cutout.jobs import manifest, storage
from cutout.jobs.errors import NotFoundError
from cutout.jobs.layout import JobLayout, group_of_name
from cutout.jobs.records import ShardStats
from cutout.jobs.rollup import MergedCounter, add_fields, fields_of, top_errors_of
from cutout.jobs.settings import settings
from cutout.jobs.sharding import shard_id_for, shard_index

log = logging.getLogger(__name__)

MAX_GROUP_SHARDS = 1000
MAX_PART_ROWS = 1_000_000
ROW_BATCH = 10_000  # rows per Parquet row group while a part is written
WAITING_FOR_SUBMIT = "submit has not finished writing the job's shards"
PARQUET_TYPE = "application/vnd.apache.parquet"

SendGroup = Callable[[str, int], None]  # (job prefix, group): queue the group's build task


# --- groups -------------------------------------------------------------------------------------
def group_shards_for(shard_size: int | None) -> int:
    """Shards per group: at most 1000 and at most about 10^6 rows per part."""
    forced = settings().manifest_group_shards
    if forced:
        return max(1, int(forced))
    rows_per_shard = max(1, shard_size or MAX_PART_ROWS // MAX_GROUP_SHARDS)
    return max(1, min(MAX_GROUP_SHARDS, MAX_PART_ROWS // rows_per_shard))


def save_parts_layout(job_prefix: str, shard_size: int | None) -> int:
    """Fix the job's group size (written with its spec): every process cuts the same groups."""
    group_shards = group_shards_for(shard_size)
    body = json.dumps({"group_shards": group_shards}).encode()
    storage.write_bytes(JobLayout.from_prefix(job_prefix).parts, body, content_type="application/json")
    _GROUP_SHARDS[job_prefix] = group_shards
    return group_shards


_GROUP_SHARDS: dict[str, int] = {}


def group_shards(job_prefix: str) -> int:
    """The job's group size (read once per process: it never changes)."""
    cached = _GROUP_SHARDS.get(job_prefix)
    if cached is not None:
        return cached
    try:
        value = int(json.loads(manifest.read_durable(JobLayout.from_prefix(job_prefix).parts))["group_shards"])
    except NotFoundError:  # a job made before parts existed
        value = group_shards_for(manifest.load_spec(job_prefix).shard_size)
    _GROUP_SHARDS[job_prefix] = value
    return value


def group_of(shard_id: str, per_group: int) -> int:
    return shard_index(shard_id) // per_group


def group_shard_ids(group: int, per_group: int, shards_total: int) -> list[str]:
    first = group * per_group
    return [shard_id_for(index) for index in range(first, min(first + per_group, shards_total))]


def groups_total(shards_total: int, per_group: int) -> int:
    return -(-shards_total // per_group)


# --- building one group -------------------------------------------------------------------------
@dataclass
class GroupBuild:
    group: int
    written: bool
    reason: str = ""
    rows: int = 0
    shard_ids: list[str] = field(default_factory=list)


def build_group(job_prefix: str, group: int) -> GroupBuild:
    """Write the group's part, then its roll-up, from its shards' records (and the rows of any
    redo that replaced some of them). Reads this group only; nothing is written unless every
    shard of the group is done."""
    layout = JobLayout.from_prefix(job_prefix)
    totals = manifest.load_totals_full(job_prefix)
    if totals is None:
        return GroupBuild(group, False, WAITING_FOR_SUBMIT)
    shard_ids = group_shard_ids(group, group_shards(job_prefix), totals["shards"])
    if not shard_ids:
        return GroupBuild(group, False, "no such group")
    stats = list(manifest.in_order(functools.partial(_stats_or_none, job_prefix, s) for s in shard_ids))
    waiting = [shard_id for shard_id, shard_stats in zip(shard_ids, stats) if shard_stats is None]
    if waiting:
        return GroupBuild(group, False, f"{len(waiting)} shard(s) of the group not done", shard_ids=shard_ids)
    columns = totals["extra_columns"]
    newer = followup_rows_for(job_prefix, set(shard_ids))
    rows = _group_rows(job_prefix, shard_ids, columns, newer)
    body, fields, top_errors, n_rows = write_part_bytes(rows, columns)
    storage.patiently(lambda: storage.write_bytes(layout.part(group), body, content_type=PARQUET_TYPE))
    rollup = {
        "group": group, "rows": n_rows, "fields": fields, "top_errors": top_errors,
        "shards": [{"id": s.shard_id, "started_at": s.started_at, "finished_at": s.finished_at,
                    "items": sum(s.counts.values())} for s in stats],
        "followups": sorted({row["job_id"] for row in newer.values()}), "built_at": time.time(),
    }
    storage.patiently(lambda: storage.write_bytes(layout.rollup(group), json.dumps(rollup).encode(),
                                                  content_type="application/json"))
    return GroupBuild(group, True, rows=n_rows, shard_ids=shard_ids)


def _stats_or_none(job_prefix: str, shard_id: str) -> ShardStats | None:
    try:
        return manifest.read_shard_stats(job_prefix, shard_id)
    except NotFoundError:
        return None


def _group_rows(job_prefix: str, shard_ids: list[str], columns: list[str],
                newer: dict[str, dict]) -> Iterator[dict]:
    job_id = manifest.job_id_of(job_prefix)
    read = (functools.partial(manifest.shard_rows, job_prefix, shard_id, columns, job_id) for shard_id in shard_ids)
    for rows in manifest.in_order(read):
        for row in rows:
            yield newer.get(row["input_uri"], row)


def write_part_bytes(rows: Iterable[dict], columns: list[str]) -> tuple[bytes, dict, dict, int]:
    """The rows as one Parquet file in memory (a part is bounded), with their fields and top
    errors for the roll-up."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = manifest.parquet_schema(columns)
    extra_names = [manifest.extra_column_name(name) for name in columns]
    fields: dict[str, float] = {}
    failed: list[dict] = []
    buffer = io.BytesIO()
    n_rows = 0
    with pq.ParquetWriter(buffer, schema) as writer:
        batch: list[dict] = []
        for row in rows:
            add_fields(fields, fields_of([row]))
            if row["status"] == "failed":
                failed.append({"status": "failed", "error_class": row.get("error_class"), "error": row.get("error")})
            batch.append(manifest.parquet_row(dict(row), extra_names))
            if len(batch) >= ROW_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                n_rows += len(batch)
                batch = []
        if batch or n_rows == 0:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            n_rows += len(batch)
    return buffer.getvalue(), fields, top_errors_of(failed), n_rows


# --- redo jobs: their rows replace the parent's in the parent's groups ---------------------------
def followup_rows_for(job_prefix: str, shard_ids: set[str]) -> dict[str, dict]:
    """The latest row per input from every redo job that replaced inputs of these shards."""
    rows: dict[str, dict] = {}
    for child in manifest.followup_prefixes(job_prefix):
        origins = manifest.parent_shards_of(child)  # child shard -> parent shards (None: unknown)
        columns = manifest.load_extra_columns(child)
        child_id = manifest.job_id_of(child)
        for child_shard in sorted(manifest.done_shard_ids(child), key=shard_index):
            if origins is not None and not set(origins.get(child_shard, ())) & shard_ids:
                continue
            for row in manifest.shard_rows(child, child_shard, columns, child_id):
                rows[row["input_uri"]] = row
    return rows


def parent_groups(child_prefix: str, child_shard_ids: list[str]) -> tuple[str, list[int]] | None:
    """The parent job and its groups that these shards of a redo job replace rows in."""
    parent = manifest.parent_prefix_of(child_prefix)
    if parent is None:
        return None
    per_group = group_shards(parent)
    origins = manifest.parent_shards_of(child_prefix)
    if origins is None:  # an older redo job: every group of the parent may hold its inputs
        totals = manifest.load_totals(parent)
        return parent, list(range(groups_total(totals[1] if totals else 0, per_group)))
    groups = {group_of(p, per_group) for s in child_shard_ids for p in origins.get(s, ())}
    return parent, sorted(groups)


# --- who builds a group, and when ---------------------------------------------------------------
def after_shard(job_prefix: str, shard_id: str, progress, send: SendGroup) -> None:
    """Called by the worker that finished ``shard_id``: if that completed its group (live
    counters say so), build the group's part inline when it is small, else queue its task.
    Two workers finishing a group's last shards together may both build it: same content."""
    per_group = group_shards(job_prefix)
    group = group_of(shard_id, per_group)
    first = group * per_group
    shards_total = progress.shards_total()
    expected = min(per_group, shards_total - first) if shards_total else per_group
    if expected <= 0 or progress.done_in_range(first, first + expected - 1) < expected:
        return
    dispatch(job_prefix, group, send)


def dispatch(job_prefix: str, group: int, send: SendGroup) -> None:
    """Build a group now if it is provably short (few shards), else send it its own task."""
    if group_shards(job_prefix) > settings().manifest_inline_shards:
        send(job_prefix, group)
        return
    result = build_and_propagate(job_prefix, group, send)
    if result.reason == WAITING_FOR_SUBMIT:
        send(job_prefix, group)  # the task waits for submit to finish


def build_and_propagate(job_prefix: str, group: int, send: SendGroup) -> GroupBuild:
    """Build the group; a redo job's group then refreshes the parent's groups it replaced rows in."""
    result = build_group(job_prefix, group)
    if result.written:
        touched = parent_groups(job_prefix, result.shard_ids)
        if touched is not None:
            parent, groups = touched
            for parent_group in groups:
                dispatch(parent, parent_group, send)
    return result


# --- reading parts and roll-ups -----------------------------------------------------------------
def part_groups(job_prefix: str) -> list[int]:
    """Groups that have a part, in order (one listing)."""
    return _groups_under(job_prefix, "manifest", ".parquet")


def _groups_under(job_prefix: str, folder: str, extension: str) -> list[int]:
    listing = JobLayout.from_prefix(job_prefix).folder(folder) + "/"
    groups = []
    for uri in storage.patiently(lambda: list(storage.list_uris(listing))):
        group = group_of_name(uri) if uri.endswith(extension) else None
        if group is not None:
            groups.append(group)
    return sorted(groups)


def rollup_groups(job_prefix: str) -> list[int]:
    """Groups that have a roll-up, in order (one listing)."""
    return _groups_under(job_prefix, "rollups", ".json")


def load_rollups(job_prefix: str) -> list[dict]:
    """Every roll-up of the job, in group order (one listing, then reads in parallel)."""
    layout = JobLayout.from_prefix(job_prefix)
    reads = (functools.partial(_load_json, layout.rollup(group)) for group in rollup_groups(job_prefix))
    return [rollup for rollup in manifest.in_order(reads) if rollup is not None]


def _load_json(uri: str) -> dict | None:
    try:
        return json.loads(manifest.read_durable(uri))
    except NotFoundError:  # removed between the listing and the read (a retry reopened it)
        return None


def read_part(job_prefix: str, group: int, columns: list[str] | None = None):
    """One part as a pyarrow Table (None when the group has no part yet)."""
    import pyarrow.parquet as pq

    try:
        data = manifest.read_durable(JobLayout.from_prefix(job_prefix).part(group))
    except NotFoundError:
        return None
    return pq.read_table(io.BytesIO(data), columns=columns)


def iter_rows(job_prefix: str, threads: int = 8) -> Iterator[dict]:
    """Every row of every part, in part order (so in shard order), parts read in parallel."""
    reads = (functools.partial(read_part, job_prefix, group) for group in part_groups(job_prefix))
    for table in manifest.in_order(reads, threads=threads):
        for row in table.to_pylist() if table is not None else ():
            yield plain_row(row)


def all_current(job_prefix: str) -> bool:
    """Every group of a fully submitted job has a current part and roll-up."""
    state = groups_state(job_prefix)
    total = groups_total(state.shards_total, state.per_group)
    return total > 0 and all(state.current(group) for group in range(total))


def plain_row(row: dict) -> dict:
    """A part's row as the records have it: map columns (pairs in Arrow) back to objects."""
    for name in ("timings", "quality"):
        if isinstance(row.get(name), list):
            row[name] = dict(row[name])
    return row


@dataclass
class GroupsState:
    """Which groups are written and current, from the roll-ups and one listing of done-markers."""

    per_group: int
    shards_total: int
    done: set[str]
    rollups: dict[int, dict]
    totals: dict = field(default_factory=dict)  # totals.json as read (empty before submit wrote it)

    def current(self, group: int) -> bool:
        """The roll-up covers exactly the group's shards (a retry or new shards make it stale)."""
        rollup = self.rollups.get(group)
        wanted = group_shard_ids(group, self.per_group, self.shards_total)
        return rollup is not None and [s["id"] for s in rollup["shards"]] == wanted

    def ready_to_build(self) -> list[int]:
        """Groups whose shards are all done but whose roll-up is missing or stale."""
        return [group for group in range(groups_total(self.shards_total, self.per_group))
                if not self.current(group)
                and set(group_shard_ids(group, self.per_group, self.shards_total)) <= self.done]

    def shards_outside_current(self) -> list[str]:
        """Done shards of groups without a current roll-up (their counts are in no roll-up)."""
        covered = {s["id"] for group, r in self.rollups.items() if self.current(group) for s in r["shards"]}
        return sorted(self.done - covered, key=shard_index)


def groups_state(job_prefix: str) -> GroupsState:
    """The roll-ups, and the done shards: from the roll-ups alone when every group is current
    (a finished job), else from one listing of done-markers."""
    totals = manifest.load_totals_full(job_prefix)
    rollups = {rollup["group"]: rollup for rollup in load_rollups(job_prefix)}
    state = GroupsState(group_shards(job_prefix), totals["shards"] if totals else 0, set(), rollups,
                        totals or {})
    groups = range(groups_total(state.shards_total, state.per_group))
    if totals is not None and all(state.current(group) for group in groups):
        state.done = {shard["id"] for rollup in rollups.values() for shard in rollup["shards"]}
    else:
        state.done = manifest.done_shard_ids(job_prefix)
    return state


def build_missing(job_prefix: str, state: GroupsState | None = None) -> list[int]:
    """Build, here, the groups whose shards are done but whose part is missing or stale (a
    worker's build task that was lost). Run by `report` and `manifest` on the user's side."""
    state = state or groups_state(job_prefix)
    built = []
    for group in state.ready_to_build():
        result = build_group(job_prefix, group)
        if result.written:
            state.rollups[group] = json.loads(manifest.read_durable(JobLayout.from_prefix(job_prefix).rollup(group)))
            built.append(group)
    return built


def merged_top_errors(rollups: Iterable[dict], limit: int) -> dict[str, int]:
    messages = MergedCounter(limit)
    for rollup in rollups:
        for message, number in rollup["top_errors"].items():
            messages.add(message, number)
    return messages.as_dict()
