"""Process one shard: the unit of work, as a plain function (no Celery in here).

Reliability comes from idempotence: every output key is deterministic (a re-run overwrites,
never duplicates), the shard's records are written in one piece and its stats file last (the
done-marker). A shard redelivered after a crash simply runs again; a shard already done is
skipped.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from cutout.jobs import manifest, sharding, storage
from cutout.jobs.layout import temp_folder
from cutout.jobs.allowlist import SourcePolicy
from cutout.jobs.records import CappedCounter, ItemRecord, ShardStats
from cutout.jobs.settings import settings
from cutout.jobs.spec import JobSpec
from cutout.workers.items import CrashGuard, JobRecords, best_effort, run_items

log = logging.getLogger(__name__)


_SPECS: dict[str, JobSpec] = {}


@dataclass
class ShardRun:
    """What ``process_shard`` did: ``stats`` is None when the shard was skipped."""

    shard_id: str
    stats: ShardStats | None
    skipped_reason: str | None = None


def load_spec_cached(job_prefix: str) -> JobSpec:
    """A job's spec never changes (its hash is its name), so each process reads it once."""
    spec = _SPECS.get(job_prefix)
    if spec is None:
        spec = manifest.load_spec(job_prefix)
        _SPECS[job_prefix] = spec
    return spec


def get_pipeline(spec: JobSpec):
    """The job's Pipeline from the process cache: its model loads once per process and job."""
    from cutout.workers.models.cache import MODEL_CACHE

    return MODEL_CACHE.pipeline(spec.pipeline, settings().device)


def process_shard(
    job_prefix: str,
    shard_id: str,
    *,
    worker_name: str = "local",
    attempt: int = 1,
    redo_failed: bool = False,
    error_class: str | None = None,
    inputs: list[str] | None = None,
    progress=None,
) -> ShardRun:
    """Run one shard end to end and write its durable records; safe to call any number of times.

    ``redo_failed`` reprocesses only the items that failed last time (optionally only those of
    ``error_class``, or only ``inputs``) and keeps every other record, so the shard still lists
    each input once.
    """
    spec = load_spec_cached(job_prefix)
    if progress is not None and best_effort(progress.is_cancelled, default=False):
        return ShardRun(shard_id, None, "job cancelled")
    if not redo_failed and manifest.shard_done(job_prefix, shard_id):
        return ShardRun(shard_id, None, "already done")
    shard = sharding.read_shard(job_prefix, shard_id)
    kept: dict[str, ItemRecord] = {}
    if redo_failed:
        kept = {
            record.input_uri: record
            for record in manifest.read_shard_records(job_prefix, shard_id)
            if not _wants_redo(record, error_class, inputs)
        }
    started = time.time()
    if progress is not None:
        best_effort(lambda: progress.shard_started(shard_id, worker_name))
        if redo_failed:
            best_effort(lambda: progress.forget_crashes(shard_id))
    guard = CrashGuard.for_shard(progress, shard_id, worker_name)
    with heartbeat(progress, worker_name):
        todo = [item for item in shard.items if item.uri not in kept]
        fresh = _process_items(spec, shard_id, todo, worker_name, guard)
    records = [kept.get(item.uri) or fresh[item.uri] for item in shard.items]
    stats = shard_stats(spec, shard_id, records, started, worker_name, attempt)
    manifest.write_shard_result(job_prefix, shard_id, records, stats)
    if progress is not None:
        best_effort(lambda: progress.shard_finished(shard_id, records))
    return ShardRun(shard_id, stats)


def _wants_redo(record: ItemRecord, error_class: str | None, inputs: list[str] | None) -> bool:
    if record.status != "failed":
        return False
    if inputs and record.input_uri not in inputs:
        return False
    return error_class is None or record.error_class == error_class


def _process_items(spec: JobSpec, shard_id: str, items, worker_name: str,
                   guard: CrashGuard | None = None) -> dict[str, ItemRecord]:
    """The shard's records by input URI, from the one item loop (``workers/items.py``)."""
    temp_dir = temp_folder(spec.destination)
    if temp_dir:  # temp files of writers killed mid-write, left by earlier attempts
        storage.sweep_temp_folder(temp_dir)
    sink = JobRecords(temp_dir)  # the shard writes them in one piece, then its done-marker
    run_items(
        items,
        pipeline=lambda: get_pipeline(spec),
        sink=sink,
        record_fields={"model": spec.pipeline.model, "config_hash": spec.pipeline.config_hash(),
                       "shard_id": shard_id, "worker": worker_name},
        guard=guard,
        source_policy=SourcePolicy.from_env(),  # the worker's allowlist, never the message's
    )
    return sink.records


def shard_stats(spec, shard_id, records, started, worker_name, attempt) -> ShardStats:
    """The shard's counts, error classes, top messages and quality flags from its records (one
    counting for a processed shard and for one recorded failed as a whole)."""
    counts = {"done": 0, "failed": 0, "skipped": 0}
    error_classes: dict[str, int] = {}
    messages = CappedCounter()
    flag_counts: dict[str, int] = {}
    for record in records:
        counts[record.status] = counts.get(record.status, 0) + 1
        for flag in record.flags if record.status == "done" else ():
            flag_counts[flag] = flag_counts.get(flag, 0) + 1
        if record.status == "failed":
            key = record.error_class or "UnknownError"
            error_classes[key] = error_classes.get(key, 0) + 1
            messages.add(f"{key}: {record.error}")
    return ShardStats(
        job_id=spec.job_id,
        shard_id=shard_id,
        counts=counts,
        error_classes=error_classes,
        top_errors=messages.as_dict(),
        started_at=started,
        finished_at=time.time(),
        worker=worker_name,
        attempt=attempt,
        flag_counts=flag_counts,
    )


# --- live progress (best effort: the durable records are the truth) ------------------------------
@contextmanager
def heartbeat(progress, worker_name: str) -> Iterator[None]:
    """Beat every few seconds while the shard runs, so `status` can tell live workers from dead."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            best_effort(lambda: progress.heartbeat(worker_name))
            if stop.wait(settings().heartbeat_interval):
                return

    thread = threading.Thread(target=beat, name="cutout-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
