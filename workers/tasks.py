"""The one Celery task. It only decides ack, retry or reject; ``cutout.workers.shard`` does the work.

Policy (defined once in ``cutout.jobs.queue``): acks late and rejected-on-worker-lost (a killed
worker's shard is redelivered; the shard is idempotent), automatic retries with jittered exponential backoff for transient errors only,
and permanent shard-level errors (no spec, no shard file) rejected without requeue. No other
exception may lose a shard: an unexpected one (a bug, a broken install) is retried a few times
with backoff, and a shard that still fails, or runs out of transient retries, gets a record
per input (``WorkerError`` or the transient class) so the job completes and ``retry-failed``
can pick it up. The shard a task holds is noted in Redis, so a live worker can re-send it if
this machine dies (``cutout.workers.liveness``).
"""
from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

import redis
from celery.exceptions import Reject
from redis.exceptions import RedisError

from cutout.jobs import manifest, manifest_parts, sharding
from cutout.jobs.errors import CutoutError, TransientStorageError, WorkerError
from cutout.jobs.layout import JobLayout, check_task
from cutout.jobs.progress import hold_shard, release_shard
from cutout.jobs.queue import TASK_PROCESS_SHARD, TRANSIENT_ERRORS, ReliableTask, redis_url
from cutout.jobs.records import ItemRecord
from cutout.jobs.redact import install_log_redaction
from cutout.jobs.settings import settings
from cutout.jobs.window import shard_left_queue
from cutout.workers import telemetry
from cutout.workers.celery_app import app
from cutout.workers.shard import heartbeat, load_spec_cached, process_shard, shard_stats

log = logging.getLogger(__name__)
install_log_redaction()  # every log line of the worker, Celery's own included, loses its secrets

# When even recording a failed shard fails, its message comes back this often, never lost.
RECORD_FAILED_RETRY_S = 600
TASK_BUILD_MANIFEST_GROUP = "cutout.build_manifest_group"
# A group finished before submit wrote totals.json waits for it: this often, this many times.
GROUP_WAIT_S, GROUP_WAIT_TRIES = 30, 240


@lru_cache(maxsize=1)
def _redis_client() -> redis.Redis:
    """One client per pool process (created lazily, so after the fork)."""
    return redis.Redis.from_url(redis_url())


def live_progress(job_id: str):
    from cutout.jobs.progress import LiveProgress

    return LiveProgress(_redis_client(), job_id)


@app.task(
    name=TASK_PROCESS_SHARD,
    bind=True,
    base=ReliableTask,  # the retry policy, defined once in cutout.jobs.queue
)
def process_shard_task(self, job_prefix: str, shard_id: str, redo_failed: bool = False,
                       error_class: str | None = None, inputs: list[str] | None = None) -> dict:
    worker_name = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    began = time.monotonic()
    try:
        check_task(job_prefix, shard_id)  # a forged message is refused before anything is read
        spec = load_spec_cached(job_prefix)
        progress = live_progress(spec.job_id)
        _hold(worker_name, spec.job_id, self.request)
        with heartbeat(progress, worker_name):
            telemetry.load_models_timed(spec)
            run = process_shard(
                job_prefix,
                shard_id,
                worker_name=worker_name,
                attempt=self.request.retries + 1,
                redo_failed=redo_failed,
                error_class=error_class,
                inputs=inputs,
                progress=progress,
            )
    except CutoutError as exc:
        if exc.permanent:
            log.error("shard %s of %s cannot run: %s: %s", shard_id, job_prefix, exc.error_class, exc)
            _next_shards(self.app, job_prefix, shard_id)
            raise Reject(f"{exc.error_class}: {exc}", requeue=False) from exc
        return _out_of_retries(self, exc, worker_name)
    except TRANSIENT_ERRORS as exc:
        return _out_of_retries(self, exc, worker_name)
    except Exception as exc:  # noqa: BLE001 - unexpected: retried, then recorded, never lost
        return _unexpected(self, exc, worker_name)
    finally:
        telemetry.BUSY_SECONDS.inc(time.monotonic() - began)
        _release(worker_name)
    _next_shards(self.app, job_prefix, shard_id)
    if run.stats is None:
        log.info("shard %s skipped: %s", shard_id, run.skipped_reason)
        telemetry.SHARDS.labels("skipped").inc()
        return {"shard_id": shard_id, "skipped": run.skipped_reason}
    _observe(job_prefix, run)
    _build_group_if_complete(job_prefix, shard_id)
    return {"shard_id": shard_id, "counts": run.stats.counts}


def _build_group_if_complete(job_prefix: str, shard_id: str) -> None:
    """The worker that finishes a group's last shard writes (or queues) that group's manifest
    part. A failure here loses nothing: the records are durable and `cutout report` builds it."""
    try:
        spec = load_spec_cached(job_prefix)
        manifest_parts.after_shard(job_prefix, shard_id, live_progress(spec.job_id), _send_group)
    except Exception as exc:  # noqa: BLE001 - the shard itself is done and recorded
        log.warning("manifest part of shard %s not written now (%s); `cutout report` will", shard_id,
                    type(exc).__name__)


def _send_group(job_prefix: str, group: int) -> None:
    queue = load_spec_cached(job_prefix).queue
    build_manifest_group_task.apply_async(kwargs={"job_prefix": job_prefix, "group": group}, queue=queue)


@app.task(name=TASK_BUILD_MANIFEST_GROUP, bind=True, base=ReliableTask)  # the shard task's retry policy
def build_manifest_group_task(self, job_prefix: str, group: int) -> dict:
    """Write one group's manifest part and roll-up: reads that group only (a few minutes at most
    for 10^6 rows), never the whole job."""
    JobLayout.from_prefix(job_prefix)  # a forged message is refused before anything is read
    if not isinstance(group, int) or group < 0:
        raise Reject(f"not a group index: {group!r}", requeue=False)
    result = manifest_parts.build_and_propagate(job_prefix, group, _send_group)
    if result.reason == manifest_parts.WAITING_FOR_SUBMIT:
        raise self.retry(countdown=GROUP_WAIT_S, max_retries=GROUP_WAIT_TRIES)
    return {"group": group, "written": result.written, "rows": result.rows, "reason": result.reason}


def _next_shards(app, job_prefix: str, shard_id: str) -> None:
    """This shard's message leaves the queue: free its place in the job's window and send the
    next shards (best effort: the reaper tops the window up too)."""
    try:
        shard_left_queue(_redis_client(), app, JobLayout.from_prefix(job_prefix).job_id, shard_id)
    except Exception as exc:  # noqa: BLE001 - the shard itself is done and recorded
        log.warning("job window not topped up now (%s); the reaper will", type(exc).__name__)


def _hold(worker_name: str, job_id: str, request) -> None:
    """Note the shard this process holds and its message's delivery tag (best effort: without
    it only liveness is lost)."""
    queue = (request.delivery_info or {}).get("routing_key")
    try:
        hold_shard(_redis_client(), worker_name, job_id, {"kwargs": dict(request.kwargs or {}), "queue": queue,
                                                          "tag": (request.properties or {}).get("delivery_tag")})
    except RedisError as exc:
        log.warning("could not note the shard this worker holds: %s", exc)


def _release(worker_name: str) -> None:
    try:
        release_shard(_redis_client(), worker_name)
    except RedisError as exc:  # the hold stays: a reaper may re-send a finished shard (skipped)
        log.warning("could not clear the shard this worker held: %s", exc)


def _observe(job_prefix: str, run) -> None:
    try:
        telemetry.observe_shard(run, manifest.read_shard_records(job_prefix, run.shard_id))
    except Exception as exc:  # noqa: BLE001 - metrics never fail a shard
        log.warning("shard metrics not recorded: %s", type(exc).__name__)


def _out_of_retries(task, exc: Exception, worker_name: str) -> dict:
    """A transient error: Celery retries it (autoretry_for); after the last retry, record it."""
    if task.request.retries < task.max_retries:
        raise exc
    error = exc if isinstance(exc, CutoutError) else TransientStorageError(f"{type(exc).__name__}: {exc}")
    return _record_failed_shard(task, error, worker_name)


def _unexpected(task, exc: Exception, worker_name: str) -> dict:
    kwargs = task.request.kwargs or {}
    retries = task.request.retries
    if retries < settings().unexpected_retries:  # then the first wait doubles each time
        countdown = settings().unexpected_backoff_s * 2**retries
        log.exception("shard %s: unexpected %s; trying again in %.0f s",
                      kwargs.get("shard_id"), type(exc).__name__, countdown)
        telemetry.SHARDS.labels("retried").inc()
        raise task.retry(exc=exc, countdown=countdown, max_retries=retries + 1)  # our own cap
    log.exception("shard %s: unexpected %s on all %d tries; recording its inputs as failed",
                  kwargs.get("shard_id"), type(exc).__name__, retries + 1)
    error = WorkerError(f"the shard failed {retries + 1} times: {type(exc).__name__}: {exc}")
    return _record_failed_shard(task, error, worker_name)


def _record_failed_shard(task, error: CutoutError, worker_name: str) -> dict:
    """Every input of the shard without a record gets one carrying ``error``; if that cannot be
    written either, the message comes back later rather than being lost."""
    kwargs = task.request.kwargs or {}
    job_prefix, shard_id = kwargs["job_prefix"], kwargs["shard_id"]
    try:
        counts = record_failed_shard(job_prefix, shard_id, error, worker_name=worker_name,
                                     attempt=task.request.retries + 1)
    except Exception as exc:  # noqa: BLE001 - the shard must stay redeliverable
        log.error("shard %s: could not record its failure (%s); trying again in %d s",
                  shard_id, type(exc).__name__, RECORD_FAILED_RETRY_S)
        raise task.retry(exc=exc, countdown=RECORD_FAILED_RETRY_S, max_retries=task.request.retries + 1)
    telemetry.SHARDS.labels("recorded_failed").inc()
    _next_shards(task.app, job_prefix, shard_id)
    _build_group_if_complete(job_prefix, shard_id)  # a recorded failure can end a group too
    return {"shard_id": shard_id, "counts": counts}


def record_failed_shard(job_prefix: str, shard_id: str, error: CutoutError, *,
                        worker_name: str, attempt: int) -> dict[str, int]:
    """Write the shard's records as failed with ``error`` (inputs already recorded keep their
    record) and its done-marker, and count it: the job completes, retry-failed can redo it."""
    spec = load_spec_cached(job_prefix)
    started = time.time()
    existing = {record.input_uri: record for record in manifest.read_shard_records(job_prefix, shard_id)}
    records = []
    for item in sharding.read_shard(job_prefix, shard_id).items:
        records.append(existing.get(item.uri) or ItemRecord(
            input_uri=item.uri, status="failed", stage=error.stage, error_class=error.error_class,
            error=str(error)[:1000], model=spec.pipeline.model, config_hash=spec.pipeline.config_hash(),
            shard_id=shard_id, worker=worker_name, job_id=spec.job_id,
        ))
    stats = shard_stats(spec, shard_id, records, started, worker_name, attempt)
    manifest.write_shard_result(job_prefix, shard_id, records, stats)
    counts = stats.counts
    try:
        live_progress(spec.job_id).shard_finished(shard_id, records)
    except RedisError as exc:
        log.warning("live progress update failed (records are still written): %s", exc)
    return counts
