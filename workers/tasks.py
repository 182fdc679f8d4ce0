"""The one Celery task. It only decides ack, retry or reject; ``cutout.workers.shard`` does the work.

Policy: acks late and rejected-on-worker-lost (a killed worker's shard is redelivered; the shard
is idempotent), automatic retries with jittered exponential backoff for transient errors only,
and permanent shard-level errors (no spec, no shard file) rejected without requeue.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache

import redis
from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cutout.jobs import manifest
from cutout.jobs.errors import CutoutError, OutOfMemoryError, TransientStorageError
from cutout.jobs.queue import TASK_PROCESS_SHARD, redis_url
from cutout.workers.celery_app import app
from cutout.workers.shard import load_spec_cached, process_shard

log = logging.getLogger(__name__)

TRANSIENT_ERRORS = (TransientStorageError, OutOfMemoryError, RedisConnectionError, RedisTimeoutError)


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
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=int(os.environ.get("CUTOUT_TASK_MAX_RETRIES", "10")),
)
def process_shard_task(self, job_prefix: str, shard_id: str, redo_failed: bool = False,
                       error_class: str | None = None, inputs: list[str] | None = None) -> dict:
    worker_name = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    try:
        spec = load_spec_cached(job_prefix)
        run = process_shard(
            job_prefix,
            shard_id,
            worker_name=worker_name,
            attempt=self.request.retries + 1,
            redo_failed=redo_failed,
            error_class=error_class,
            inputs=inputs,
            progress=live_progress(spec.job_id),
        )
    except CutoutError as exc:
        if exc.permanent:
            log.error("shard %s of %s cannot run: %s: %s", shard_id, job_prefix, exc.error_class, exc)
            raise Reject(f"{exc.error_class}: {exc}", requeue=False) from exc
        raise
    if run.stats is None:
        log.info("shard %s skipped: %s", shard_id, run.skipped_reason)
        return {"shard_id": shard_id, "skipped": run.skipped_reason}
    manifest.assemble_if_complete(job_prefix, progress=live_progress(spec.job_id))  # the last shard
    return {"shard_id": shard_id, "counts": run.stats.counts}
