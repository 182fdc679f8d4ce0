"""Submitting, resuming, retrying and cancelling jobs. Never imports torch or ``workers``.

Everything durable lives in the destination (spec, shard files, records, stats); Redis holds
only the queue, live progress and a job-id → destination index. So every operation here can
start again from the destination alone: that is what ``resume --dest`` does after Redis is lost.

Submitting streams: sources → shards → shard files, one shard at a time; task messages go
through the job's bounded window (``cutout.jobs.window``): the first ones at submit, the rest
as the queue drains. Memory stays flat: output-key and known-input checks hold 64-bit digests
(``cutout.jobs.digests``), never the inputs themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from cutout.jobs import manifest, sharding, storage, window
from cutout.jobs.digests import DigestSet, digest
from cutout.jobs.errors import ConfigError, CutoutError, NotFoundError
from cutout.jobs.layout import JobLayout
from cutout.jobs.queue import broker_url as default_broker_url
from cutout.jobs.queue import redis_url as default_redis_url
from cutout.jobs.settings import settings
from cutout.jobs.queue import send_process_shard, submitter_app
from cutout.jobs.records import ShardStats
from cutout.jobs.redact import redact
from cutout.jobs.boxes import box_expander
from cutout.jobs.sources import input_identity, iter_source_items
from cutout.jobs.spec import JobSpec
from cutout.jobs.window import ShardWindow

log = logging.getLogger(__name__)

JOB_INDEX_KEY = "cutout:job-destinations"  # hash: job id → destination
PROGRESS_EVERY_SHARDS = 200


@dataclass
class SubmitResult:
    job_id: str
    job_prefix: str
    shards_total: int
    shards_enqueued: int  # sent now; the rest of the job's shards follow as the window drains
    shards_already_done: int
    items_total: int
    skipped: dict[str, int] = field(default_factory=dict)  # source entries passed over, by reason
    items_new: int | None = None  # incremental submits: inputs added to the job this time


@dataclass
class JobRef:
    """Where a job's durable records are; found from Redis, or from ``--dest`` when Redis is lost."""

    job_id: str
    destination: str

    @property
    def layout(self) -> JobLayout:
        return JobLayout(self.destination, self.job_id)

    @property
    def prefix(self) -> str:
        return self.layout.prefix


# --- Redis helpers ------------------------------------------------------------------------------
def redis_client(url: str | None = None) -> redis.Redis:
    return redis.Redis.from_url(url or default_redis_url())


def progress_url(redis_url: str | None, broker_url: str | None) -> str:
    """The job's live-progress Redis: the one named, else CUTOUT_REDIS_URL, else the broker the
    job is sent to (a caller who names only a broker must not write progress to another Redis)."""
    return redis_url or settings().redis_url or broker_url or default_redis_url()


def live_progress(client: redis.Redis, job_id: str):
    from cutout.jobs.progress import LiveProgress

    return LiveProgress(client, job_id)


def find_job(job_id: str, *, destination: str | None = None, redis_url: str | None = None) -> JobRef:
    """A job by id: ``destination`` wins; otherwise the Redis index written at submit time."""
    if destination:
        return JobRef(job_id, destination)
    stored = redis_client(redis_url).hget(JOB_INDEX_KEY, job_id)
    if stored is None:
        raise NotFoundError(
            f"job {job_id} is not known to Redis ({redact(redis_url or default_redis_url())}); "
            "pass --dest DEST (the job's destination) to use its durable records"
        )
    return JobRef(job_id, stored.decode())


# --- submit / resume ----------------------------------------------------------------------------
def submit_job(
    spec: JobSpec,
    *,
    broker_url: str | None = None,
    redis_url: str | None = None,
    all_files: bool = False,
    force: bool = False,
) -> SubmitResult:
    """Save the spec, cut the sources into shards and enqueue every shard not done yet.

    The job id is the spec's hash, so submitting the same spec again resumes: shards with a
    done-marker are skipped and shard files already written are reused, never rewritten.
    While this Redis still knows the job's shards are queued, a resubmit sends nothing (no
    duplicate messages); ``force`` (``cutout resume``) re-enqueues every unfinished shard.
    """
    redis_url = progress_url(redis_url, broker_url)
    job_id = spec.job_id
    prefix = sharding.job_prefix(spec.destination, job_id)
    client = redis_client(redis_url)
    progress = live_progress(client, job_id)
    _save_spec_once(prefix, spec)
    client.hset(JOB_INDEX_KEY, job_id, spec.destination)
    totals = manifest.load_totals(prefix)  # present once every shard file was written
    if totals is not None and progress.is_queued() and not force:
        done = manifest.done_shard_ids(prefix)
        items_total, shards_total = totals
        return SubmitResult(job_id, prefix, shards_total, 0, len(done), items_total)
    app = submitter_app(broker_url or default_broker_url())
    if totals is not None:
        result = _enqueue_missing(spec, prefix, totals, client, app, progress)
    else:
        result = _stream_and_enqueue(spec, prefix, client, app, progress, all_files)
    progress.mark_queued()
    return result


def _stream_and_enqueue(spec, prefix, client, app, progress, all_files) -> SubmitResult:
    done = set(manifest.done_shard_ids(prefix))  # both empty unless an earlier submit stopped midway
    written = set(manifest.all_shard_ids(prefix))
    shards_total = items_total = already_done = 0
    skips = storage.ListingSkips()
    columns = ExtraColumns()
    shards = sharding.iter_shards(
        columns.watch(iter_source_items(spec.sources, all_files=all_files, skips=skips,
                                        boxes=box_expander(spec))),
        destination=spec.destination,
        extension=spec.pipeline.extension,
        suffix=spec.suffix,
        shard_size=spec.shard_size,
    )
    job_window = ShardWindow(client, spec.job_id)
    job_window.reset(prefix=prefix, queue=spec.queue, next_index=0, end=0)
    with app.producer_or_acquire() as producer:
        feeder = WindowFeeder(job_window, app, producer)
        # a first submit sends while it writes; finishing a stopped one sends once all is written
        on_durable = _nothing if done else feeder.durable
        with ShardWriter(prefix) as writer:
            for shard in _saying_how_to_finish(shards, spec):
                shards_total += 1
                items_total += len(shard.items)
                already_done += shard.shard_id in done
                writer.write_then(shard, on_durable,
                                  skip_write=shard.shard_id in written or shard.shard_id in done)
                if shards_total % PROGRESS_EVERY_SHARDS == 0:
                    progress.set_total(items_total, shards_total)
        if not done:
            feeder.flush()
    if done:
        feeder.sent, _ = window.rebuild(client, app, job_id=spec.job_id, prefix=prefix, queue=spec.queue,
                                        shards_total=shards_total)
    enqueued = feeder.sent
    if shards_total == 0:
        raise ConfigError(f"no input images found in {', '.join(spec.sources)}")
    manifest.save_totals(prefix, items_total, shards_total, skipped=skips.counts, extra_columns=columns.names)
    progress.set_total(items_total, shards_total)
    if done:
        progress.rebuild_from_durable(prefix)
    if skips.total:
        log.warning("job %s: %d source entries skipped (%s)", spec.job_id, skips.total,
                    ", ".join(f"{reason} {n}" for reason, n in sorted(skips.counts.items())))
    return SubmitResult(spec.job_id, prefix, shards_total, enqueued, already_done, items_total,
                        skipped=dict(skips.counts))


def _saying_how_to_finish(shards, spec: JobSpec):
    """Shards passed through; a listing that fails after the first shard re-raises its error
    saying how to finish. Shards sent so far stay valid (their files are reused, a done shard
    is never redone), so submitting again, or resuming, completes the job."""
    started = False
    try:
        for shard in shards:
            started = True
            yield shard
    except CutoutError as exc:
        if not started:
            raise
        raise type(exc)(
            f"{exc}. Job {spec.job_id} is only partly submitted: run the same `cutout submit` again, "
            f"or `cutout resume {spec.job_id} --dest {spec.destination}`, to finish submitting it",
            stage=exc.stage,
        ) from exc


class WindowFeeder:
    """Moves the window's end up as shard files become durable (in shard order) and tops the
    window up every few shards, so the first shards run while submit is still writing."""

    EVERY_SHARDS = 64

    def __init__(self, job_window: ShardWindow, app, producer=None):
        self.window, self.app, self.producer = job_window, app, producer
        self.durable_end = 0
        self.sent = 0

    def durable(self, shard_id: str) -> None:
        self.durable_end = sharding.shard_index(shard_id) + 1
        if self.durable_end % self.EVERY_SHARDS == 0:
            self.flush()

    def flush(self) -> None:
        self.window.extend(self.durable_end)
        self.sent += window.top_up(self.window, self.app, producer=self.producer)


class ExtraColumns:
    """Collects the names of list-file columns seen while the items stream past."""

    def __init__(self, names: list[str] | None = None):
        self.names: list[str] = list(names or [])

    def watch(self, items):
        for item in items:
            for name in item.extra or ():
                if name not in self.names:
                    self.names.append(name)
            yield item


class ShardWriter:
    """Writes shard files on a bounded thread pool and sends each shard's task, in order,
    only once its file is durable. One file at a time is fsync-bound (about 3 ms each, 95 s
    for a million URIs); 16 in flight took 16 s. The window bounds memory."""

    def __init__(self, prefix: str, threads: int = 16, window: int = 256):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.prefix = prefix
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-writer")
        self.pending: deque = deque()
        self.window = window

    def write_then(self, shard, send, *, skip_write: bool = False) -> None:
        future = None if skip_write else self.pool.submit(sharding.write_shard, self.prefix, shard)
        self.pending.append((shard.shard_id, future, send))
        while len(self.pending) > self.window or (
            self.pending and (self.pending[0][1] is None or self.pending[0][1].done())
        ):
            self._send_oldest()

    def _send_oldest(self) -> None:
        shard_id, future, send = self.pending.popleft()
        if future is not None:
            future.result()  # re-raises a failed write: its task is never sent
        send(shard_id)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            while self.pending and exc_type is None:
                self._send_oldest()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)


# --- incremental: new inputs of a growing source -------------------------------------------------
INCREMENTAL_LOCK_S = 3600


def submit_incremental(
    spec: JobSpec,
    *,
    broker_url: str | None = None,
    redis_url: str | None = None,
    all_files: bool = False,
) -> SubmitResult:
    """Extend the job with shards holding only the inputs it does not list yet.

    The job id stays the spec's hash, so a bucket that keeps growing is one job: its records
    and manifest keep one record per input across every run. New inputs get new shards after
    the last one (old shard files are never rewritten), their output keys are claimed after
    every key already handed out (no collision with earlier outputs), and totals grow. Inputs
    already in a shard file count as known even while their shard is still queued. Two
    incremental submits of one job at once are refused (a Redis lock).
    """
    redis_url = progress_url(redis_url, broker_url)
    prefix = sharding.job_prefix(spec.destination, spec.job_id)
    if manifest.load_totals(prefix) is None:  # never fully submitted: an ordinary first submit
        result = submit_job(spec, broker_url=broker_url, redis_url=redis_url, all_files=all_files)
        result.items_new = result.items_total
        return result
    client = redis_client(redis_url)
    lock = f"cutout:job:{spec.job_id}:extending"
    if not client.set(lock, "1", nx=True, ex=INCREMENTAL_LOCK_S):
        raise ConfigError(f"another incremental submit of job {spec.job_id} is running (lock {lock})")
    try:
        return _extend_job(spec, prefix, client, broker_url, all_files)
    finally:
        client.delete(lock)


def _extend_job(spec, prefix, client, broker_url, all_files) -> SubmitResult:
    client.hset(JOB_INDEX_KEY, spec.job_id, spec.destination)
    known = _KnownInputs.read(prefix, spec.destination)
    items_old, _ = manifest.load_totals(prefix)
    progress = live_progress(client, spec.job_id)
    columns = ExtraColumns(manifest.load_extra_columns(prefix))
    fresh = known.new_only(columns.watch(iter_source_items(spec.sources, all_files=all_files,
                                                           boxes=box_expander(spec))))
    shards = sharding.iter_shards(
        fresh, destination=spec.destination, extension=spec.pipeline.extension, suffix=spec.suffix,
        shard_size=spec.shard_size, first_index=known.next_index, items_before=items_old,
        claims=known.output_keys,
    )
    app = submitter_app(broker_url or default_broker_url())
    job_window = ShardWindow(client, spec.job_id)
    windowed = job_window.exists()  # else (Redis lost it) it is rebuilt once the shards are written
    new_items = new_shards = 0
    with app.producer_or_acquire() as producer:
        feeder = WindowFeeder(job_window, app, producer)
        with ShardWriter(prefix) as writer:
            for shard in shards:
                new_items += len(shard.items)
                new_shards += 1
                writer.write_then(shard, feeder.durable if windowed else _nothing)
        if windowed:
            feeder.flush()
    shards_total = known.next_index + new_shards
    manifest.save_totals(prefix, items_old + new_items, shards_total, extra_columns=columns.names)
    progress.set_total(items_old + new_items, shards_total)
    progress.rebuild_from_durable(prefix)
    if not windowed:
        feeder.sent, _ = window.rebuild(client, app, job_id=spec.job_id, prefix=prefix, queue=spec.queue,
                                        shards_total=shards_total)
    progress.mark_queued()
    done = len(manifest.done_shard_ids(prefix))
    return SubmitResult(spec.job_id, prefix, shards_total, feeder.sent, done, items_old + new_items,
                        items_new=new_items)


def _nothing(_shard_id: str) -> None:
    """The shard file is durable; its message waits for the window."""


class _KnownInputs:
    """Inputs and output keys already in the job's shard files, as 64-bit digests (bounded)."""

    def __init__(self) -> None:
        self._inputs = DigestSet()
        self.output_keys = sharding.KeyClaims()
        self.next_index = 0

    @classmethod
    def read(cls, prefix: str, destination: str) -> "_KnownInputs":
        from concurrent.futures import ThreadPoolExecutor

        known = cls()
        base = storage.join_uri(destination, "x")[:-1]  # the destination with one trailing "/"
        shard_ids = manifest.all_shard_ids(prefix)
        with ThreadPoolExecutor(16, thread_name_prefix="shard-reader") as pool:
            for some in sharding.batches(shard_ids, 64):  # a bounded number of shards in memory
                for shard in pool.map(lambda shard_id: sharding.read_shard(prefix, shard_id), some):
                    for item in shard.items:
                        known._inputs.add(digest(item.uri))
                        if item.output_uri.startswith(base):
                            known.output_keys.take(item.output_uri[len(base):])
                    known._inputs.settle()
        if shard_ids:
            known.next_index = sharding.shard_index(shard_ids[-1]) + 1
        return known

    def new_only(self, items):
        """The items whose input the job does not have yet, in order (checked a batch at a time)."""
        for batch in sharding.batches(items, 4096):
            known = self._inputs.contains_many([digest(item.uri) for item in batch])
            yield from (item for item, seen in zip(batch, known) if not seen)


def _enqueue_missing(spec, prefix, totals, client, app, progress) -> SubmitResult:
    """Every shard file exists already: rebuild the window from the done-markers and send the
    first shards without one (no re-listing of the sources).

    A job is a snapshot of its sources at first submit: objects added later are picked up by
    an incremental submit (``submit_incremental``).
    """
    items_total, shards_total = totals
    progress.rebuild_from_durable(prefix)
    sent, done = window.rebuild(client, app, job_id=spec.job_id, prefix=prefix, queue=spec.queue,
                                shards_total=shards_total)
    return SubmitResult(spec.job_id, prefix, shards_total, sent, done, items_total)


def resume_job(
    job_id: str,
    *,
    destination: str | None = None,
    broker_url: str | None = None,
    redis_url: str | None = None,
) -> SubmitResult:
    """Re-enqueue every shard without a done-marker, from the durable records alone.

    Works after Redis was flushed: the spec, shard files and stats live in the destination, and
    live progress is rebuilt from them. A cancelled job is un-cancelled.
    """
    redis_url = progress_url(redis_url, broker_url)
    ref = find_job(job_id, destination=destination, redis_url=redis_url)
    spec = load_job_spec(ref)
    progress = live_progress(redis_client(redis_url), job_id)
    _uncancel(progress)
    return submit_job(spec, broker_url=broker_url, redis_url=redis_url, force=True)


def load_job_spec(ref: JobRef) -> JobSpec:
    try:
        spec = manifest.load_spec(ref.prefix)
    except NotFoundError as exc:
        raise NotFoundError(f"no job {ref.job_id} under {ref.destination}: {exc}") from exc
    if spec.job_id != ref.job_id:
        raise ConfigError(f"spec under {ref.prefix} names job {spec.job_id}, not {ref.job_id}")
    return spec


# --- retry failed items -------------------------------------------------------------------------
@dataclass
class RetryResult:
    job_id: str
    shards_enqueued: int
    items_to_retry: int


def retry_failed(
    job_id: str,
    *,
    error_class: str | None = None,
    inputs: tuple[str, ...] = (),
    destination: str | None = None,
    broker_url: str | None = None,
    redis_url: str | None = None,
) -> RetryResult:
    """Reprocess only the failed inputs (optionally of one error class, or just ``inputs``) in
    their own shards.

    Each affected shard loses its done-marker and is re-enqueued with ``redo_failed``: the worker
    keeps the shard's good records and redoes the chosen failed ones, so the manifest still lists
    each input exactly once, with its latest status. Nothing is changed when one of ``inputs``
    is not a failed input of the job.
    """
    redis_url = progress_url(redis_url, broker_url)
    ref = find_job(job_id, destination=destination, redis_url=redis_url)
    spec = load_job_spec(ref)
    plan = _plan_retry(ref.prefix, error_class, {input_identity(uri) for uri in inputs})
    client = redis_client(redis_url)
    progress = live_progress(client, job_id)
    app = submitter_app(broker_url or default_broker_url())
    for shard_id in plan:
        manifest.reopen_shard(ref.prefix, shard_id)  # not done again; its group's part is rebuilt
    if plan:  # recount live progress without them, before a worker can count them again
        progress.clear()
        progress.rebuild_from_durable(ref.prefix)
    with app.producer_or_acquire() as producer:
        for shard_id, shard_inputs in plan.items():
            send_process_shard(
                app, ref.prefix, shard_id, queue=spec.queue, redo_failed=True,
                error_class=error_class, inputs=shard_inputs if inputs else None, producer=producer,
            )
    # counted in the job's window, so it sends fewer new shards until these are through
    ShardWindow(client, job_id).add_pending([sharding.shard_index(shard_id) for shard_id in plan])
    if plan:
        progress.mark_queued()
    items = sum(len(shard_inputs) for shard_inputs in plan.values())
    return RetryResult(job_id, len(plan), items)


def _plan_retry(prefix: str, error_class: str | None, inputs: set[str]) -> dict[str, list[str]]:
    """Shard id -> the failed inputs to redo there (all of them, for a whole-class retry)."""
    plan: dict[str, list[str]] = {}
    for stats in manifest.iter_shard_stats(prefix):
        if not _failures_matching(stats, error_class):
            continue
        chosen = [
            record.input_uri
            for record in manifest.read_shard_records(prefix, stats.shard_id)
            if record.status == "failed" and (error_class is None or record.error_class == error_class)
            and (not inputs or input_identity(record.input_uri) in inputs)
        ]
        if chosen:
            plan[stats.shard_id] = chosen
    missing = inputs - {input_identity(uri) for chosen in plan.values() for uri in chosen}
    if missing:
        raise ConfigError(
            f"not failed inputs of this job{f' with error class {error_class}' if error_class else ''}: "
            f"{', '.join(sorted(missing)[:5])}{' ...' if len(missing) > 5 else ''} "
            "(give input URIs as the manifest lists them; a local file by its path or file:// URI)"
        )
    return plan


def _failures_matching(stats: ShardStats, error_class: str | None) -> int:
    if error_class is None:
        return stats.counts.get("failed", 0)
    return stats.error_classes.get(error_class, 0)


def stats_uri(prefix: str, shard_id: str) -> str:
    return JobLayout.from_prefix(prefix).stats(shard_id)


# --- redo flagged outputs with other options -----------------------------------------------------
@dataclass
class RedoResult:
    job_id: str  # the redo job: its own spec, so its records carry the new config hash
    parent_job_id: str
    items: int
    shards_enqueued: int
    config_hash: str


def redo_outputs(
    job_id: str,
    *,
    flags: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
    overrides: dict | None = None,
    destination: str | None = None,
    broker_url: str | None = None,
    redis_url: str | None = None,
) -> RedoResult:
    """Rerun the done outputs carrying any of ``flags`` (or exactly ``inputs``) with the job's
    pipeline options changed by ``overrides`` (e.g. another matting method).

    Pipeline options decide the pixels and are part of a job's identity, so a redo is its own
    job beside the original: its spec (sources: a list file of the chosen inputs in the
    original's folder) hashes to a new id, its records carry the new config hash, and its shard
    files reuse the original output keys, so the new outputs replace the old ones. The original
    links it as a follow-up: its manifest lists each input's latest record (one per input),
    refreshed when the redo's last shard finishes. The same redo submitted again resumes.
    """
    redis_url = progress_url(redis_url, broker_url)
    from cutout.jobs.records import QUALITY_FLAGS
    from cutout.jobs.spec import stable_hash

    unknown = set(flags) - set(QUALITY_FLAGS)
    if unknown:
        raise ConfigError(f"unknown quality flag(s) {', '.join(sorted(unknown))}: use {', '.join(QUALITY_FLAGS)}")
    if not flags and not inputs:
        raise ConfigError("choose what to redo: --flag NAME (repeatable) or --input URI")
    ref = find_job(job_id, destination=destination, redis_url=redis_url)
    parent = load_job_spec(ref)
    pipeline = _pipeline_with(parent.pipeline, overrides or {})
    chosen, origins = _select_for_redo(ref.prefix, set(flags), {input_identity(uri) for uri in inputs})
    selection = stable_hash({"inputs": [item.uri for item in chosen], "flags": sorted(flags)})[:12]
    spec = parent.model_copy(update={
        "sources": (storage.join_uri(ref.prefix, "redo", f"{selection}.txt"),), "pipeline": pipeline,
        "weights_sha256": parent.weights_sha256 if pipeline.weights == parent.pipeline.weights else None,
    })
    prefix = sharding.job_prefix(spec.destination, spec.job_id)
    if manifest.load_totals(prefix) is None:
        _write_redo_job(ref.prefix, prefix, spec, chosen, origins)
    result = submit_job(spec, broker_url=broker_url, redis_url=redis_url)
    return RedoResult(spec.job_id, job_id, len(chosen), result.shards_enqueued, pipeline.config_hash())


def _pipeline_with(pipeline, overrides: dict):
    from pydantic import ValidationError

    try:
        return pipeline.with_overrides(overrides)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc


def _select_for_redo(prefix: str, flags: set[str], inputs: set[str]) -> tuple[list, dict[str, str]]:
    """The original shard items of the chosen inputs, judged by each input's latest record, and
    the shard each came from."""
    wanted: dict[str, set[str]] = {}
    for shard_id, row in manifest.iter_latest_rows(prefix):
        if inputs and input_identity(row["input_uri"]) not in inputs:
            continue
        if inputs or (row["status"] == "done" and flags & set(row.get("flags") or ())):
            wanted.setdefault(shard_id, set()).add(row["input_uri"])
    chosen = [item for shard_id, uris in wanted.items()
              for item in sharding.read_shard(prefix, shard_id).items if item.uri in uris]
    missing = inputs - {input_identity(item.uri) for item in chosen}
    if missing:
        raise ConfigError(f"not inputs of this job with a record: {', '.join(sorted(missing)[:5])}")
    if not chosen:
        raise ConfigError(f"no done output of this job carries {' or '.join(sorted(flags))}")
    origins = {uri: shard_id for shard_id, uris in wanted.items() for uri in uris}
    return chosen, origins


def _write_redo_job(parent_prefix: str, prefix: str, spec: JobSpec, chosen: list,
                    origins: dict[str, str]) -> None:
    """Spec, the list of chosen inputs, shard files holding the original items, totals; linked last."""
    storage.write_bytes(spec.sources[0], "".join(item.uri + "\n" for item in chosen).encode(),
                        content_type="text/plain")
    manifest.save_spec(prefix, spec)
    shards = list(sharding.split_by_size(chosen, spec.shard_size))
    for index, items in enumerate(shards):
        sharding.write_shard(prefix, sharding.Shard(sharding.shard_id_for(index), items))
    manifest.save_totals(prefix, len(chosen), len(shards),
                         extra_columns=manifest.load_extra_columns(parent_prefix))
    parent_shards = {sharding.shard_id_for(index): sorted({origins[item.uri] for item in items})
                     for index, items in enumerate(shards)}
    manifest.link_followup(parent_prefix, spec.job_id, parent_shards)


# --- cancel -------------------------------------------------------------------------------------
def cancel_job(job_id: str, *, destination: str | None = None, redis_url: str | None = None) -> JobRef:
    """Workers skip the job's remaining shards; `resume` starts it again."""
    ref = find_job(job_id, destination=destination, redis_url=redis_url)
    live_progress(redis_client(redis_url), job_id).cancel()
    return ref


def _uncancel(progress) -> None:
    progress.redis.delete(progress.key("cancel"))


def _save_spec_once(prefix: str, spec: JobSpec) -> None:
    """The spec is named by its hash, so an existing one is the same: never rewrite it."""
    try:
        manifest.load_spec(prefix)
    except NotFoundError:
        manifest.save_spec(prefix, spec)


# --- report -------------------------------------------------------------------------------------
def job_report(job_id: str, *, destination: str | None = None, redis_url: str | None = None) -> dict:
    """Totals from the group roll-ups (``manifest.summarise``); first writes the parts of done
    groups that have none (a lost build task)."""
    ref = find_job(job_id, destination=destination, redis_url=redis_url)
    load_job_spec(ref)
    summary = manifest.summarise(ref.prefix, build=True)
    return {
        "job_id": job_id,
        "destination": ref.destination,
        "job_prefix": ref.prefix,
        "complete": summary.complete and summary.groups_current == summary.groups_total,
        "shards_done": summary.shards_done,
        "shards_total": summary.shards_total,
        "items_total": summary.items_total,
        "counts": summary.counts,
        "error_classes": summary.error_classes,
        "top_errors": summary.top_errors,
        "flag_counts": summary.flag_counts,
        "stage_seconds": summary.stage_seconds,
        "skipped": summary.skipped,
        "manifest_uri": summary.manifest_uri,
        "manifest_parts": f"{summary.groups_current}/{summary.groups_total}",
        "uncounted_shards": summary.uncounted_shards,
    }
