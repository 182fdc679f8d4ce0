"""Tallies of records: what `status` and `report` show, summed without re-reading every record.

One ``Tally`` shape serves three places, so the figures agree wherever they are read:
  * live counters in Redis (``cutout.jobs.progress``): each finished item adds its fields;
  * a group's roll-up (``rollups/g<group>.json``, written beside the group's manifest part by
    ``cutout.jobs.manifest_parts``): the tally of the group's latest records, plus the shards
    it covers (with their run times, for the rate chart);
  * ``report``: the sum of every roll-up.

Fields (flat, so Redis can hold them in one hash): ``status:<s>`` inputs per status,
``class:<E>`` failures per error class, ``flag:<f>`` done outputs per quality flag and
``time:<stage>`` seconds summed per pipeline stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from cutout.jobs.records import CappedCounter

TOP_ERRORS_LIMIT = 20
OTHER_MESSAGES = "(other messages)"


def record_fields(status: str, error_class: str | None, flags: Iterable[str],
                  timings: Mapping[str, float]) -> dict[str, float]:
    """One record's contribution to a tally, as flat fields."""
    fields: dict[str, float] = {f"status:{status}": 1}
    if status == "failed":
        fields[f"class:{error_class or 'UnknownError'}"] = 1
    if status == "done":
        for flag in flags:
            fields[f"flag:{flag}"] = fields.get(f"flag:{flag}", 0) + 1
    for stage, seconds in timings.items():
        fields[f"time:{stage}"] = fields.get(f"time:{stage}", 0.0) + float(seconds)
    return fields


def fields_of(records: Iterable) -> dict[str, float]:
    """The summed fields of ``ItemRecord``s (or manifest rows as dicts)."""
    total: dict[str, float] = {}
    for record in records:
        row = record if isinstance(record, Mapping) else record.__dict__
        timings = row.get("timings") or {}
        if not isinstance(timings, Mapping):  # a Parquet map column comes back as pairs
            timings = dict(timings)
        add_fields(total, record_fields(row["status"], row.get("error_class"), row.get("flags") or (),
                                        timings))
    return total


def add_fields(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, number in part.items():
        total[key] = total.get(key, 0) + number


@dataclass
class Tally:
    """Counts by status, error class and flag, and seconds per stage, read from flat fields."""

    counts: dict[str, int] = field(default_factory=dict)
    error_classes: dict[str, int] = field(default_factory=dict)
    flag_counts: dict[str, int] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: Mapping[str, float]) -> "Tally":
        tally = cls()
        buckets = {"status": tally.counts, "class": tally.error_classes, "flag": tally.flag_counts,
                   "time": tally.stage_seconds}
        for key, number in fields.items():
            kind, _, name = key.partition(":")
            bucket = buckets.get(kind)
            if bucket is None or not name:
                continue
            bucket[name] = bucket.get(name, 0) + (float(number) if kind == "time" else int(float(number)))
        tally.error_classes = _by_count(tally.error_classes)
        tally.flag_counts = _by_count(tally.flag_counts)
        return tally

    @property
    def processed(self) -> int:
        return sum(self.counts.values())


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def top_errors_of(rows: Iterable[Mapping]) -> dict[str, int]:
    """The commonest failure messages of some rows, capped (a million errors stay small)."""
    messages = CappedCounter(TOP_ERRORS_LIMIT)
    for row in rows:
        if row["status"] == "failed":
            messages.add(f"{row.get('error_class') or 'UnknownError'}: {row.get('error')}")
    return messages.as_dict()


class MergedCounter:
    """Merges capped message counters, keeping at most ``limit`` distinct messages."""

    def __init__(self, limit: int = TOP_ERRORS_LIMIT):
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
