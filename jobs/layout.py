"""Every durable path of a job, built in one place from ids checked against the formats the
submitter produces. Nothing else joins a job id, a shard id or a task message's string into a
path: a forged ``../../x`` shard id is refused here, before anything is read or written.

Layout under ``DEST/_cutout/jobs/<job_id>`` (see cutout.jobs.manifest for what each file holds)::

    spec.json  totals.json  parts.json  shards/<shard>.jsonl  records/<shard>.jsonl
    stats/<shard>.json  manifest/part-<group>.parquet  rollups/<group>.json
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cutout.jobs import storage
from cutout.jobs.errors import InvalidIdError

CONTROL_PREFIX = "_cutout"
JOB_ID = re.compile(r"[0-9a-f]{16}")  # JobSpec.job_id: the spec's sha256, first 16 hex digits
SHARD_ID = re.compile(r"s[0-9]{6,12}")  # sharding.shard_id_for: "s" and a zero-padded index
GROUP_WIDTH = 8  # part and roll-up names: a zero-padded group index (sorts as numbers do)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\\]")


def temp_folder(destination: str) -> str | None:
    """The local folder ``DEST/_cutout/tmp`` where workers write outputs before renaming them
    into place (so a killed writer's temp file is never left among the outputs), or None for
    an object store (its writes are atomic)."""
    if storage.scheme_of(destination) != "local":
        return None
    return storage._local_path(storage.join_uri(destination, CONTROL_PREFIX, "tmp"))


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise InvalidIdError(f"not a job id: {job_id!r} (expected 16 hex digits)")
    return job_id


def check_shard_id(shard_id: object) -> str:
    if not isinstance(shard_id, str) or not SHARD_ID.fullmatch(shard_id):
        raise InvalidIdError(f"not a shard id: {shard_id!r} (expected s and 6 to 12 digits)")
    return shard_id


@dataclass(frozen=True)
class JobLayout:
    """Where a job's files are. ``JobLayout.from_prefix`` parses (and checks) a job prefix as
    task messages carry it; every method returns a URI strictly inside the job's folder."""

    destination: str
    job_id: str

    def __post_init__(self) -> None:
        check_job_id(self.job_id)

    @classmethod
    def from_prefix(cls, job_prefix: object) -> "JobLayout":
        """``DEST/_cutout/jobs/<job_id>`` back to its layout; ``InvalidIdError`` for anything
        the submitter could not have written (dot segments, control characters, another shape)."""
        if not isinstance(job_prefix, str) or _UNSAFE.search(job_prefix):
            raise InvalidIdError(f"not a job prefix: {job_prefix!r}")
        head, sep, job_id = job_prefix.rpartition(f"/{CONTROL_PREFIX}/jobs/")
        path = head.split("://", 1)[-1]
        if not sep or any(part in (".", "..") for part in path.split("/")):
            raise InvalidIdError(f"not a job prefix: {job_prefix!r}")
        layout = cls(head, check_job_id(job_id))
        if layout.prefix != job_prefix:
            raise InvalidIdError(f"not a job prefix: {job_prefix!r}")
        return layout

    @property
    def prefix(self) -> str:
        return storage.join_uri(self.destination, CONTROL_PREFIX, "jobs", self.job_id)

    @property
    def spec(self) -> str:
        return self._file("spec.json")

    @property
    def totals(self) -> str:
        return self._file("totals.json")

    @property
    def parent(self) -> str:
        """Written in a redo job: names the job whose inputs it redoes."""
        return self._file("parent.json")

    @property
    def parts(self) -> str:
        """How the manifest is cut into parts (shards per group), fixed when the job is made."""
        return self._file("parts.json")

    @property
    def report(self) -> str:
        return self._file("report.html")

    def followup(self, job_id: str) -> str:
        """Written in a job for each redo job that replaces some of its records."""
        return self._file("followups", f"{check_job_id(job_id)}.json")

    def sibling(self, job_id: str) -> "JobLayout":
        """Another job of the same destination (a redo and its parent)."""
        return JobLayout(self.destination, check_job_id(job_id))

    def folder(self, name: str) -> str:
        """The folders a listing walks."""
        if name not in ("shards", "records", "stats", "followups", "manifest", "rollups"):
            raise ValueError(f"no folder {name!r} in a job's layout")
        return self._file(name)

    def shard(self, shard_id: str) -> str:
        return self._file("shards", f"{check_shard_id(shard_id)}.jsonl")

    def records(self, shard_id: str) -> str:
        return self._file("records", f"{check_shard_id(shard_id)}.jsonl")

    def stats(self, shard_id: str) -> str:
        return self._file("stats", f"{check_shard_id(shard_id)}.json")

    def part(self, group: int) -> str:
        """The manifest part of a group of shards: every input's latest record, as Parquet."""
        return self._file("manifest", f"part-{_group_name(group)}.parquet")

    def rollup(self, group: int) -> str:
        """The group's roll-up: its tallies and shards (written after its part)."""
        return self._file("rollups", f"{_group_name(group)}.json")

    def holds_output(self, uri: str) -> bool:
        """Whether ``uri`` is an output location this job may write: below the destination,
        outside its ``_cutout/`` area, with no dot segments."""
        base, uri = _comparable(self.destination).rstrip("/") + "/", _comparable(uri)
        if not uri.startswith(base) or _UNSAFE.search(uri):
            return False
        parts = uri[len(base):].split("/")
        return parts[0] != CONTROL_PREFIX and not any(p in ("", ".", "..") for p in parts)

    def _file(self, *parts: str) -> str:
        return storage.join_uri(self.prefix, *parts)


def _group_name(group: int) -> str:
    if not isinstance(group, int) or group < 0:
        raise InvalidIdError(f"not a group index: {group!r}")
    return f"{group:0{GROUP_WIDTH}d}"


def group_of_name(name: str) -> int | None:
    """``part-00000012.parquet`` or ``00000012.json`` back to 12; None for any other name."""
    stem = name.rsplit("/", 1)[-1].split(".", 1)[0].removeprefix("part-")
    return int(stem) if re.fullmatch(r"[0-9]{%d,12}" % GROUP_WIDTH, stem) else None


def _comparable(uri: str) -> str:
    """A local destination may be written as a path or a file:// URI: compare plain paths
    (dot segments are refused by the caller, not resolved here)."""
    return storage._local_path(uri) if storage.scheme_of(uri) == "local" else uri


def check_task(job_prefix: object, shard_id: object) -> JobLayout:
    """The worker's boundary: a task's job prefix and shard id, checked before any read."""
    layout = JobLayout.from_prefix(job_prefix)
    check_shard_id(shard_id)
    return layout
