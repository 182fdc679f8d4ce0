"""The one item loop: read each input → pipeline batch → write its output → one record.

``cutout run`` and the shard runner (``workers/shard.py``) both drive their inputs through
``run_items``; they differ only in the sink that receives the records (a JSONL file in the
output folder, flushed per item, or the shard's records written in one piece at the end).

Every input gets exactly one record, whatever happens to it:
  * a read that keeps failing transiently (HTTP 500, a host that never answers) is retried a
    few times with backoff, within a total time cap, then recorded ``TransientStorageError``
    (``retry-failed --error-class TransientStorageError`` redoes it); a permanent read error
    (missing, too large) is recorded at once;
  * a pipeline failure is recorded with its stage;
  * an output that cannot be written (a name the file system refuses, a denied write) is
    recorded ``OutputWriteError`` (or ``TransientStorageError`` after retries); its
    neighbours are written as usual.

Storage I/O overlaps the model: while batch i runs, batch i+1 is read and batch i-1's outputs
are written on a small thread pool, so a GPU does not wait for S3 round trips; memory stays
bounded by about three batches. ``CrashGuard`` keeps an input that kills the process from
taking its neighbours down on every redelivery.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol, Sequence, TypeVar

from redis.exceptions import RedisError

from cutout.jobs import sharding, storage
from cutout.jobs.boxes import box_of, image_uri_of
from cutout.jobs.errors import (
    CutoutError,
    OutputWriteError,
    StorageError,
    TransientStorageError,
    WorkerCrashError,
)
from cutout.jobs.records import ItemRecord
from cutout.jobs.settings import settings
from cutout.jobs.sharding import ShardItem

log = logging.getLogger(__name__)

T = TypeVar("T")

TrimapSource = Callable[[ShardItem], "bytes | None"]


class RecordSink(Protocol):
    """Where finished records go; ``emit`` is called once per input, never concurrently.
    ``temp_dir``: where outputs are written before their rename (None: beside them)."""

    temp_dir: str | None

    def emit(self, record: ItemRecord) -> None: ...


class JobRecords:
    """The job-records sink: a shard keeps its records until it writes them in one piece."""

    def __init__(self, temp_dir: str | None = None) -> None:
        self.records: dict[str, ItemRecord] = {}
        self.temp_dir = temp_dir  # where outputs are written before their rename (layout.temp_folder)

    def emit(self, record: ItemRecord) -> None:
        self.records[record.input_uri] = record


class FolderRecords:
    """The local-folder sink of ``cutout run``: ``OUT/_cutout_run.jsonl``.

    Each record is appended and flushed as its item finishes, so a stopped run keeps what it
    did; ``close`` rewrites the file with one line per input (the latest). A line carries the
    input's list-file columns as its manifest row would (a box item's ``box``, ``box_index``,
    ``label`` ...; ``extra_<name>`` where a record field has the name), so each output can be
    told apart. The records of an earlier run tell a rerun which inputs are already done with
    this configuration: the same input file, settings and row (an edited box is redone).
    """

    FILE_NAME = "_cutout_run.jsonl"
    TEMP_NAME = "_cutout_run.tmp"  # outputs are written here, then renamed into place

    def __init__(self, out_dir: str, on_record: Callable[[ItemRecord], None] | None = None):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, self.FILE_NAME)
        self.temp_dir = os.path.join(out_dir, self.TEMP_NAME)  # a killed run's temps stay here
        storage.sweep_temp_folder(self.temp_dir)
        self.columns: dict[str, dict] = {}  # list-file columns of each input, as written
        self.latest = self._load()
        self.fingerprints: dict[str, str | None] = {}
        self.expected_columns: dict[str, dict] = {}  # this run's items' columns
        self.on_record = on_record
        self.handle = None  # opened with the first record: a run that stops early writes nothing

    def _load(self) -> dict[str, ItemRecord]:
        """Records of earlier runs, the last line per input winning; a torn line is ignored."""
        latest: dict[str, ItemRecord] = {}
        if not os.path.exists(self.path):
            return latest
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    record = ItemRecord.model_validate(row)
                except ValueError:
                    continue  # the last line of a killed run may be half written
                latest.pop(record.input_uri, None)
                latest[record.input_uri] = record
                self.columns[record.input_uri] = {
                    k: v for k, v in row.items() if k not in ItemRecord.model_fields}
        return latest

    def expect(self, item: ShardItem, fingerprint: str | None) -> None:
        """Note what an item of this run is (its input's size and mtime, its row's columns)."""
        self.fingerprints[item.uri] = fingerprint
        self.expected_columns[item.uri] = record_columns(item.extra)

    def already_done(self, item: ShardItem, fingerprint: str | None, config_hash: str) -> bool:
        """Done earlier from the same input (size and mtime), the same row (a box item's box)
        and the same settings, and the output is still there."""
        record = self.latest.get(item.uri)
        return bool(
            record is not None and record.status == "done" and record.output_uris
            and fingerprint is not None and record.input_fingerprint == fingerprint
            and record.config_hash == config_hash
            and self.columns.get(item.uri, {}) == record_columns(item.extra)
            and all(storage.exists(uri) for uri in record.output_uris)
        )

    def emit(self, record: ItemRecord) -> None:
        record.input_fingerprint = self.fingerprints.get(record.input_uri)
        self.columns[record.input_uri] = self.expected_columns.get(record.input_uri, {})
        if self.handle is None:
            os.makedirs(self.out_dir, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8")
        self.handle.write(self._line(record))
        self.handle.flush()
        self.latest.pop(record.input_uri, None)
        self.latest[record.input_uri] = record
        if self.on_record is not None:
            self.on_record(record)

    def _line(self, record: ItemRecord) -> str:
        row = {**record.model_dump(mode="json"), **self.columns.get(record.input_uri, {})}
        return json.dumps(row, ensure_ascii=False) + "\n"

    def close(self) -> None:
        """One line per input from now on (reruns appended newer lines for the same inputs)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.temp_dir)  # gone once empty; a killed writer's temp keeps it
        if self.handle is None:
            return  # nothing new: the file (if any) is as an earlier run left it
        self.handle.close()
        body = "".join(self._line(record) for record in self.latest.values())
        storage.write_bytes(self.path, body.encode())


def record_columns(extra: dict | None) -> dict:
    """An item's list-file columns as its record and manifest row carry them (JSON values,
    ``extra_<name>`` for a name a record field has: ``jobs.manifest.extra_column_name``)."""
    from cutout.jobs.manifest import extra_column_name

    if not extra:
        return {}
    return json.loads(json.dumps({extra_column_name(k): v for k, v in extra.items()},
                                 ensure_ascii=False, default=str))


def run_items(
    items: Sequence[ShardItem],
    *,
    pipeline: Callable[[], object],
    sink: RecordSink,
    record_fields: dict,
    guard: "CrashGuard | None" = None,
    trimaps: TrimapSource | None = None,
    batch_size: int | None = None,
    source_policy=None,
) -> None:
    """Run every item and emit exactly one record for each.

    ``pipeline`` makes (or returns the cached) ``Pipeline`` on first need, so a shard of
    unreadable inputs never loads a model. ``record_fields`` fill every record (model,
    config hash, shard, worker). ``source_policy`` (a worker's allowlist, ``jobs.allowlist``)
    is checked before each read; ``cutout run`` reads what its user names. A KeyboardInterrupt stops the loop: outputs being written
    finish and their records are emitted; nothing else is started.
    """
    loop = _Loop(pipeline, sink, record_fields, guard or CrashGuard(), trimaps, source_policy)
    loop.record_condemned(items)
    batches = loop.guard.batches(items, batch_size or settings().batch_size)
    if batches:
        loop.run(batches)


class _Loop:
    """One ``run_items`` call: batches through the pipeline, storage I/O on a thread pool."""

    def __init__(self, pipeline, sink: RecordSink, record_fields: dict, guard: "CrashGuard",
                 trimaps: TrimapSource | None, source_policy=None):
        self.source_policy = source_policy
        self.pipeline = pipeline
        self.sink = sink
        self.record_fields = record_fields
        self.guard = guard
        self.trimaps = trimaps
        self.emit_lock = threading.Lock()
        self.unreported: list[ItemRecord] = []  # emitted, not yet in the live counters
        self.last_read: tuple[str, Future] | None = None  # boxes of one image share its read

    def emit(self, record: ItemRecord) -> None:
        with self.emit_lock:
            self.sink.emit(record)
            self.unreported.append(record)

    def report_counts(self) -> None:
        """Live counters move per item: one Redis round trip per batch (CrashGuard's store)."""
        with self.emit_lock:
            records, self.unreported = self.unreported, []
        progress = self.guard.progress
        if records and progress is not None:
            best_effort(lambda: progress.items_finished(self.guard.shard_id, records))

    def new_record(self, item: ShardItem) -> ItemRecord:
        return ItemRecord(input_uri=item.uri, status="failed", **self.record_fields)

    def record_condemned(self, items: Sequence[ShardItem]) -> None:
        for item in self.guard.condemned(items):
            record = self.new_record(item)
            mark_failed(record, WorkerCrashError(
                f"{item.uri}: the worker process died {self.guard.crashes(item.uri)} times while this "
                "input was alone on the model (a crash in a decoder or the model, or the OOM killer); "
                "not retried"), default_stage="pipeline")
            self.emit(record)

    def run(self, batches: list[list[ShardItem]]) -> None:
        io_pool = ThreadPoolExecutor(settings().io_threads, thread_name_prefix="cutout-io")
        try:
            next_reads = self.start_reads(io_pool, batches[0])
            previous_writes: list[Future] = []
            for index, batch in enumerate(batches):
                reads = next_reads
                if index + 1 < len(batches):
                    next_reads = self.start_reads(io_pool, batches[index + 1])  # read-ahead
                writes = self.run_batch(io_pool, batch, reads)
                _wait_all(previous_writes)  # at most two batches of outputs in memory
                self.report_counts()
                previous_writes = writes
            _wait_all(previous_writes)
        finally:  # on Ctrl-C: unstarted reads are dropped, writes under way finish and emit
            io_pool.shutdown(wait=True, cancel_futures=True)
            self.report_counts()

    def start_reads(self, io_pool: ThreadPoolExecutor, batch: list[ShardItem]) -> list[Future]:
        return [self.read_once(io_pool, item) for item in batch]

    def read_once(self, io_pool: ThreadPoolExecutor, item: ShardItem) -> Future:
        """One read per image: the boxes of one image (consecutive items, cutout.jobs.boxes)
        share the read of the first, and so one bytes object (decoded once by the pipeline)."""
        uri = image_uri_of(item.uri, item.extra)
        if self.last_read is None or self.last_read[0] != uri:
            self.last_read = (uri, io_pool.submit(read_input, uri, self.source_policy))
        return self.last_read[1]

    def run_batch(self, io_pool, batch: list[ShardItem], reads: list[Future]) -> list[Future]:
        from cutout.workers.pipeline import PipelineInput

        ready: list[tuple[ShardItem, ItemRecord, PipelineInput]] = []
        for item, read in zip(batch, reads):
            record = self.new_record(item)
            try:
                data, record.timings["read"] = read.result()
                ready.append((item, record, PipelineInput(item.uri, data, trimap=self.hand_trimap(item),
                                                          box=box_of(item.extra))))
            except CutoutError as exc:  # transient ones too: retried per item already
                mark_failed(record, exc, default_stage="read")
                self.emit(record)
        if not ready:
            return []
        pipeline = self.pipeline()  # loading the model is not the inputs' fault
        with self.guard.on_model([item.uri for item, _, _ in ready]):
            outcomes = pipeline.run([given for _, _, given in ready])
        if self.trimaps is not None:  # hand trimaps asked for: say which inputs had none
            from cutout.workers.pipeline import NO_HAND_TRIMAP_NOTE

            for (_, _, given), outcome in zip(ready, outcomes):
                if given.trimap is None and outcome.ok:
                    outcome.notes.append(NO_HAND_TRIMAP_NOTE)
        return [io_pool.submit(self.finish, item, record, outcome)
                for (item, record, _), outcome in zip(ready, outcomes)]

    def hand_trimap(self, item: ShardItem) -> bytes | None:
        """The input's hand trimap, when trimaps were given and it has one; one that cannot be
        read fails its input, not the batch."""
        if self.trimaps is None:
            return None
        try:
            return self.trimaps(item)
        except OSError as exc:
            raise StorageError(f"cannot read the hand trimap of {item.uri}: {exc.strerror or exc}") from exc

    def finish(self, item: ShardItem, record: ItemRecord, outcome) -> None:
        apply_outcome(item, record, outcome, temp_dir=self.sink.temp_dir)
        self.emit(record)


def read_input(uri: str, policy=None) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    try:
        data = with_item_retries(
            f"read {uri}", lambda: storage.read_bytes(uri, max_bytes=settings().max_input_bytes, policy=policy))
    except OSError as exc:  # anything the storage layer did not type is still this item's error
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    return data, time.perf_counter() - t0


def apply_outcome(item: ShardItem, record: ItemRecord, outcome, *, temp_dir: str | None = None) -> None:
    """Copy the pipeline's outcome into the record and write the output (one item's fate)."""
    record.timings.update(outcome.timings)
    record.width, record.height = outcome.width, outcome.height
    record.notes = list(outcome.notes)
    record.quality = dict(getattr(outcome, "quality", None) or {})
    record.flags = list(getattr(outcome, "flags", None) or [])
    if not outcome.ok:
        mark_failed(record, outcome.error, default_stage="pipeline")
        return
    target = item.output_uri
    if outcome.extension and not target.endswith(outcome.extension):
        target = sharding.with_extension(target, outcome.extension)  # keeps collision renames
    t0 = time.perf_counter()
    try:
        write_output(target, outcome.data, temp_dir)
    except CutoutError as exc:
        mark_failed(record, exc, default_stage="write")
        return
    record.timings["write"] = time.perf_counter() - t0
    record.output_uris = [target]
    record.status = "done"


def write_output(target: str, data: bytes, temp_dir: str | None = None) -> None:
    """Write with per-item retries; any failure becomes a typed error for this item's record."""
    try:
        with_item_retries(f"write {target}", lambda: storage.write_bytes(
            target, data, content_type=_content_type(target), temp_dir=temp_dir))
    except TransientStorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - one unwritable output must never fail its neighbours
        raise OutputWriteError(f"cannot write the output {target}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, CutoutError) else f"{type(exc).__name__}: {exc}"


def mark_failed(record: ItemRecord, exc: Exception | None, *, default_stage: str) -> None:
    record.status = "failed"
    record.output_uris = []
    if exc is None:
        record.stage, record.error_class, record.error = default_stage, "UnknownError", "no outcome"
        return
    record.stage = getattr(exc, "stage", None) or default_stage
    record.error_class = getattr(exc, "error_class", type(exc).__name__)
    record.error = str(exc)[:1000]


def with_item_retries(what: str, call: Callable[[], T]) -> T:
    """A few retries of one item with doubling backoff, within ``CUTOUT_ITEM_RETRY_MAX_S`` in all.

    The storage layer already retries each call; this outer loop rides out a longer blip
    (a server restarting) without holding the shard: after it, the item is recorded.
    """
    policy = settings()
    started = time.monotonic()
    for attempt in range(1, policy.item_attempts + 1):
        try:
            return call()
        except TransientStorageError as exc:
            elapsed = time.monotonic() - started
            delay = policy.item_backoff_s * 2 ** (attempt - 1)
            if attempt >= policy.item_attempts or elapsed + delay > policy.item_retry_max_s:
                raise TransientStorageError(
                    f"{what}: gave up after {attempt} attempt(s) in {elapsed:.1f}s: {exc}") from exc
            time.sleep(delay)
    raise AssertionError("unreachable")


def _wait_all(futures: list[Future]) -> None:
    """Wait for every future, then raise the first error (none is left running unseen)."""
    wait(futures)
    for future in futures:
        future.result()


_CONTENT_TYPES = {".png": "image/png", ".webp": "image/webp", ".jpg": "image/jpeg"}


def _content_type(uri: str) -> str | None:
    return _CONTENT_TYPES.get(os.path.splitext(uri)[1].lower())


class CrashGuard:
    """Keeps an input that kills the worker process (a native crash in a decoder, the OOM
    killer) from taking its shard, and so its neighbours, down on every redelivery.

    Each batch is marked in Redis while it is on the model and unmarked after; a mark found
    when the shard starts again means the last attempt died with that batch. Its inputs then
    run one at a time, and one that was alone on the model at ``CUTOUT_MAX_ITEM_CRASHES`` deaths is
    recorded as failed (``WorkerCrashError``). Best effort: without Redis nothing is isolated.
    Two live workers on one shard (a visibility timeout shorter than the shard) can mistake
    each other's marks for deaths, one more reason to keep that timeout above the slowest shard.
    ``CrashGuard()`` (no progress store) isolates nothing: what ``cutout run`` uses.
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
        history = best_effort(lambda: progress.crash_history(shard_id), default={}) or {}
        if history:
            log.warning("shard %s: earlier attempts died with %d input(s) on the model; "
                        "running them one at a time", shard_id, len(history))
        return cls(progress, shard_id, worker, history)

    def crashes(self, uri: str) -> int:
        return self.history.get(uri, 0)

    def batches(self, items: Sequence[ShardItem], size: int) -> list[list[ShardItem]]:
        """Suspects alone, the rest in batches of ``size`` (condemned inputs are not batched)."""
        condemned = {item.uri for item in self.condemned(items)}
        suspects = [item for item in items if item.uri in self.history and item.uri not in condemned]
        normal = [item for item in items if item.uri not in self.history]
        return [[item] for item in suspects] + [normal[i : i + size] for i in range(0, len(normal), size)]

    def condemned(self, items: Sequence[ShardItem]) -> list[ShardItem]:
        return [item for item in items if self.crashes(item.uri) >= settings().max_item_crashes]

    @contextmanager
    def on_model(self, uris: list[str]) -> Iterator[None]:
        if self.progress is None:
            yield
            return
        best_effort(lambda: self.progress.batch_on_model(self.shard_id, uris, self.worker))
        try:
            yield
        finally:  # a SIGKILL skips this: the mark stays, and the next attempt reads it
            best_effort(lambda: self.progress.batch_off_model(self.shard_id))


def best_effort(call: Callable[[], T], default: T | None = None) -> T | None:
    """Live progress must never fail a shard: a Redis hiccup is logged, the records still land."""
    try:
        return call()
    except RedisError as exc:
        log.warning("live progress update failed (records are still written): %s", exc)
        return default
