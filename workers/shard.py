"""Process one shard: the unit of work, as a plain function (no Celery in here).

Reliability comes from idempotence: every output key is deterministic (a re-run overwrites,
never duplicates), the shard's records are written in one piece and its stats file last (the
done-marker). A shard redelivered after a crash simply runs again; a shard already done is
skipped.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from redis.exceptions import RedisError

from cutout.jobs import manifest, sharding, storage
from cutout.jobs.allowlist import SourcePolicy
from cutout.jobs.errors import CutoutError, TransientStorageError, WorkerCrashError
from cutout.jobs.records import CappedCounter, ItemRecord, ShardStats
from cutout.jobs.settings import settings
from cutout.jobs.spec import JobSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH_SIZE = settings().batch_size
MAX_INPUT_BYTES = settings().max_input_bytes
IO_THREADS = settings().io_threads  # concurrent reads and writes per shard
ITEM_STORAGE_ATTEMPTS = 3  # transient storage errors on one item, before the shard is retried
# Times a worker may die with one input alone on the model before that input is recorded failed.
MAX_ITEM_CRASHES = settings().max_item_crashes
HEARTBEAT_INTERVAL_S = settings().heartbeat_interval

_SPECS: dict[str, JobSpec] = {}
_PIPELINES: dict[str, object] = {}


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
    """One Pipeline (and so one loaded model) per process and configuration, made on first use."""
    key = spec.pipeline.config_hash()
    pipeline = _PIPELINES.get(key)
    if pipeline is None:
        from cutout.workers.pipeline import Pipeline

        pipeline = Pipeline(spec.pipeline, device=settings().device)
        _PIPELINES.clear()  # a worker serves one configuration at a time; free the old model
        _PIPELINES[key] = pipeline
    return pipeline


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
    if progress is not None and _safe(progress.is_cancelled, default=False):
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
        _safe(lambda: progress.shard_started(shard_id, worker_name))
        if redo_failed:
            _safe(lambda: progress.forget_crashes(shard_id))
    guard = CrashGuard.for_shard(progress, shard_id, worker_name)
    with heartbeat(progress, worker_name):
        todo = [item for item in shard.items if item.uri not in kept]
        fresh = _process_items(spec, shard_id, todo, worker_name, guard)
    records = [kept.get(item.uri) or fresh[item.uri] for item in shard.items]
    stats = _shard_stats(spec, shard_id, records, started, worker_name, attempt)
    manifest.write_shard_result(job_prefix, shard_id, records, stats)
    if progress is not None:
        _safe(lambda: progress.shard_finished(shard_id, stats.counts))
    return ShardRun(shard_id, stats)


def _wants_redo(record: ItemRecord, error_class: str | None, inputs: list[str] | None) -> bool:
    if record.status != "failed":
        return False
    if inputs and record.input_uri not in inputs:
        return False
    return error_class is None or record.error_class == error_class


class CrashGuard:
    """Keeps an input that kills the worker process (a native crash in a decoder, the OOM
    killer) from taking its shard, and so its neighbours, down on every redelivery.

    Each batch is marked in Redis while it is on the model and unmarked after; a mark found
    when the shard starts again means the last attempt died with that batch. Its inputs then
    run one at a time, and one that was alone on the model at ``MAX_ITEM_CRASHES`` deaths is
    recorded as failed (``WorkerCrashError``). Best effort: without Redis nothing is isolated.
    Two live workers on one shard (a visibility timeout shorter than the shard) can mistake
    each other's marks for deaths, one more reason to keep that timeout above the slowest shard.
    """

    def __init__(self, progress=None, shard_id: str = "", worker: str = "?",
                 history: dict[str, int] | None = None):
        self.progress = progress
        self.shard_id = shard_id
        self.worker = worker
        self.history = history or {}

    @classmethod
    def for_shard(cls, progress, shard_id: str, worker: str) -> "CrashGuard":
        if progress is None:
            return cls()
        history = _safe(lambda: progress.crash_history(shard_id), default={}) or {}
        if history:
            log.warning("shard %s: earlier attempts died with %d input(s) on the model; "
                        "running them one at a time", shard_id, len(history))
        return cls(progress, shard_id, worker, history)

    def crashes(self, uri: str) -> int:
        return self.history.get(uri, 0)

    def batches(self, items: list) -> list[list]:
        """Suspects alone, the rest in BATCH_SIZE batches (condemned inputs are not batched)."""
        condemned = {item.uri for item in self.condemned(items)}
        suspects = [item for item in items if item.uri in self.history and item.uri not in condemned]
        normal = [item for item in items if item.uri not in self.history]
        return [[item] for item in suspects] + [normal[i : i + BATCH_SIZE] for i in range(0, len(normal), BATCH_SIZE)]

    def condemned(self, items: list) -> list:
        return [item for item in items if self.crashes(item.uri) >= MAX_ITEM_CRASHES]

    @contextmanager
    def on_model(self, uris: list[str]) -> Iterator[None]:
        if self.progress is None:
            yield
            return
        _safe(lambda: self.progress.batch_on_model(self.shard_id, uris, self.worker))
        try:
            yield
        finally:  # a SIGKILL skips this: the mark stays, and the next attempt reads it
            _safe(lambda: self.progress.batch_off_model(self.shard_id))


def _process_items(spec: JobSpec, shard_id: str, items, worker_name: str,
                   guard: CrashGuard | None = None) -> dict[str, ItemRecord]:
    """Read, run and write in batches, with storage I/O overlapping the model.

    While batch i runs through the pipeline, batch i+1 is downloaded and batch i-1's outputs
    are uploaded on a small thread pool, so a GPU does not wait for S3 round trips. Memory is
    bounded by about three batches. A transient storage error on any item fails the shard
    (it is retried whole, nothing of it recorded); a permanent one fails only that item.
    """
    guard = guard or CrashGuard()
    records: dict[str, ItemRecord] = {}
    for item in guard.condemned(items):
        record = records[item.uri] = _base_record(spec, shard_id, item, worker_name)
        _mark_failed(record, WorkerCrashError(
            f"{item.uri}: the worker process died {guard.crashes(item.uri)} times while this input "
            "was alone on the model (a crash in a decoder or the model, or the OOM killer); not retried"
        ), default_stage="pipeline")
    batches = guard.batches(items)
    if not batches:
        return records
    with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="cutout-io") as io_pool:
        next_reads = _start_reads(io_pool, batches[0])
        previous_writes: list[Future] = []
        for index, batch in enumerate(batches):
            reads = next_reads
            if index + 1 < len(batches):
                next_reads = _start_reads(io_pool, batches[index + 1])  # read-ahead
            readable = []
            for item, read in zip(batch, reads):
                record = _base_record(spec, shard_id, item, worker_name)
                records[item.uri] = record
                try:
                    data, record.timings["read"] = read.result()
                    readable.append((item, data, record))
                except TransientStorageError:
                    raise  # the whole shard is retried; nothing of it was recorded yet
                except CutoutError as exc:
                    _mark_failed(record, exc, default_stage="read")
            writes = []
            if readable:
                pipeline = get_pipeline(spec)  # loading the model is not the inputs' fault
                with guard.on_model([item.uri for item, _, _ in readable]):
                    outcomes = pipeline.process_batch([(item.uri, data) for item, data, _ in readable])
                writes = [
                    io_pool.submit(_apply_outcome, spec, item, record, outcome)
                    for (item, _, record), outcome in zip(readable, outcomes)
                ]
            _wait_all(previous_writes)  # at most two batches of outputs in memory
            previous_writes = writes
        _wait_all(previous_writes)
    return records


def _start_reads(io_pool: ThreadPoolExecutor, batch) -> list[Future]:
    return [io_pool.submit(_read_input, item.uri) for item in batch]


def _read_input(uri: str) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    policy = SourcePolicy.from_env()  # the worker's allowlist (its own settings, never the message's)
    data = _with_item_retries(lambda: storage.read_bytes(uri, max_bytes=MAX_INPUT_BYTES, policy=policy))
    return data, time.perf_counter() - t0


def _wait_all(futures: list[Future]) -> None:
    """Wait for every future, then raise the first error (none is left running unseen)."""
    wait(futures)
    for future in futures:
        future.result()


def _apply_outcome(spec: JobSpec, item, record: ItemRecord, outcome) -> None:
    record.timings.update(outcome.timings)
    record.width, record.height = outcome.width, outcome.height
    record.notes = list(outcome.notes)
    if not outcome.ok:
        _mark_failed(record, outcome.error, default_stage="pipeline")
        return
    target = item.output_uri
    if outcome.extension and not target.endswith(outcome.extension):
        target = sharding.with_extension(target, outcome.extension)  # keeps collision renames
    t0 = time.perf_counter()
    data = outcome.data
    _with_item_retries(lambda: storage.write_bytes(target, data, content_type=_content_type(target)))
    record.timings["write"] = time.perf_counter() - t0
    record.output_uris = [target]
    record.status = "done"
    record.quality, record.flags = dict(outcome.quality), list(outcome.flags)


def _base_record(spec: JobSpec, shard_id: str, item, worker_name: str) -> ItemRecord:
    return ItemRecord(
        input_uri=item.uri,
        status="failed",
        model=spec.pipeline.model,
        config_hash=spec.pipeline.config_hash(),
        shard_id=shard_id,
        worker=worker_name,
    )


def _mark_failed(record: ItemRecord, exc: Exception | None, *, default_stage: str) -> None:
    record.status = "failed"
    record.output_uris = []
    if exc is None:
        record.stage, record.error_class, record.error = default_stage, "UnknownError", "no outcome"
        return
    record.stage = getattr(exc, "stage", None) or default_stage
    record.error_class = getattr(exc, "error_class", type(exc).__name__)
    record.error = str(exc)[:1000]


def _with_item_retries(call: Callable[[], T]) -> T:
    """A couple of quick retries for one item; storage already backs off inside each call."""
    for attempt in range(1, ITEM_STORAGE_ATTEMPTS + 1):
        try:
            return call()
        except TransientStorageError:
            if attempt == ITEM_STORAGE_ATTEMPTS:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


_CONTENT_TYPES = {".png": "image/png", ".webp": "image/webp", ".jpg": "image/jpeg"}


def _content_type(uri: str) -> str | None:
    return _CONTENT_TYPES.get(os.path.splitext(uri)[1].lower())


def _shard_stats(spec, shard_id, records, started, worker_name, attempt) -> ShardStats:
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
def _safe(call: Callable[[], T], default: T | None = None) -> T | None:
    """Live progress must never fail a shard: a Redis hiccup is logged, the records still land."""
    try:
        return call()
    except RedisError as exc:
        log.warning("live progress update failed (records are still written): %s", exc)
        return default


@contextmanager
def heartbeat(progress, worker_name: str) -> Iterator[None]:
    """Beat every few seconds while the shard runs, so `status` can tell live workers from dead."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            _safe(lambda: progress.heartbeat(worker_name))
            if stop.wait(HEARTBEAT_INTERVAL_S):
                return

    thread = threading.Thread(target=beat, name="cutout-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)
