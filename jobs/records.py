"""Durable records: one ``ItemRecord`` per input, one ``ShardStats`` per finished shard.

Failures are data. A shard's stats file is written last and is its done-marker.
"""
from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import BaseModel, Field

ItemStatus = Literal["done", "failed", "skipped"]


class ItemRecord(BaseModel):
    input_uri: str
    output_uris: list[str] = Field(default_factory=list)
    status: ItemStatus
    stage: str | None = None  # failing stage, when failed
    error_class: str | None = None
    error: str | None = None
    notes: list[str] = Field(default_factory=list)  # fallbacks taken (e.g. "matting-fallback")
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage
    width: int | None = None
    height: int | None = None
    model: str | None = None
    config_hash: str | None = None
    shard_id: str | None = None
    worker: str | None = None
    job_id: str | None = None
    # What the input was when it was read ("size:mtime_ns" of a local file), so `cutout run`
    # can tell an unchanged input from an edited one and skip only the former.
    input_fingerprint: str | None = None
    # Quality signals of a done output (see cutout.workers.quality): measurements such as
    # "alpha_coverage", "unknown_share", "confidence", and the names of the flags they raised
    # (QUALITY_FLAGS), so a report can show and a retry can target doubtful outputs.
    quality: dict[str, float] = Field(default_factory=dict)
    flags: list[str] = Field(default_factory=list)


# Flags a done output can carry; each names what a person should look at.
QUALITY_FLAGS = (
    "empty_alpha",  # (almost) nothing kept: the subject was probably missed
    "full_frame_alpha",  # (almost) everything kept: the background was probably not removed
    "wide_unknown_band",  # a large share of the image was uncertain
    "low_confidence",  # the model's mean confidence was low
    "matting_skipped",  # matting was not run (budget, option or fallback)
    "matting_degraded",  # matting fell back to a cheaper method
    "likely_wrong",  # the quality score (the estimated chance the cutout is right) is low
    "multiple_objects",  # the cutout holds separate parts of similar size: maybe not one subject
)

# Version of the quality score's model (cutout.workers.quality.SCORE_MODEL and the flag
# thresholds): part of every job's config hash, so outputs scored by another model are not
# taken for done with the same settings. Change it whenever the coefficients change.
QUALITY_MODEL = "score-5"


class ShardStats(BaseModel):
    job_id: str
    shard_id: str
    counts: dict[str, int]
    error_classes: dict[str, int] = Field(default_factory=dict)
    top_errors: dict[str, int] = Field(default_factory=dict)  # capped counter of messages
    started_at: float
    finished_at: float
    worker: str | None = None
    attempt: int = 1
    flag_counts: dict[str, int] = Field(default_factory=dict)  # quality flags of done outputs


class CappedCounter:
    """Counts messages but keeps at most ``limit`` distinct keys, so a million errors stay small."""

    def __init__(self, limit: int = 20):
        self.limit = limit
        self.counts: Counter[str] = Counter()
        self.other = 0

    def add(self, key: str) -> None:
        key = key[:300]
        if key in self.counts or len(self.counts) < self.limit:
            self.counts[key] += 1
        else:
            self.other += 1

    def as_dict(self) -> dict[str, int]:
        data = dict(self.counts.most_common())
        if self.other:
            data["(other messages)"] = self.other
        return data
