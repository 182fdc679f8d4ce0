"""Shards held by dead machines come back in about a minute, not after the visibility timeout.

A SIGKILLed worker, or a machine that lost power, leaves its shard's message unacked in Redis,
where kombu hands it out again only after the visibility timeout (3 hours by default, since it
must exceed the slowest shard). Each task records the shard it holds (``cutout.jobs.progress``
``hold_shard``) and its heartbeat thread beats every 5 s; every live worker runs a reaper that,
under a Redis lock so one reaps at a time, re-sends the shard of any worker silent for
``CUTOUT_WORKER_STALE_S`` (60 s). The old message, redelivered hours later, finds the shard's
done-marker and is skipped; a false alarm (a worker frozen for a minute) costs duplicate work,
never a duplicate record: outputs are idempotent and a shard is counted once. The same
sweep keeps every job's bounded window of shard messages topped up (``cutout.jobs.window``).
"""
from __future__ import annotations

import logging
import threading

import redis
from redis.exceptions import RedisError

from cutout.jobs import progress, window
from cutout.jobs.queue import TASK_PROCESS_SHARD, redis_url
from cutout.jobs.settings import settings
from cutout.workers import telemetry

log = logging.getLogger(__name__)

LOCK_KEY = "cutout:reaper:lock"


def reap_once(client, app, worker: str) -> int:
    """Re-send the shards of silent workers, if this worker gets the lock; how many were sent."""
    if not client.set(LOCK_KEY, worker, nx=True, ex=max(1, int(settings().reap_interval))):
        return 0
    sent = 0
    for entry in progress.claim_stale_holds(client):
        task = entry["task"]
        log.warning("worker %s holding shard %s of job %s stopped beating; sending the shard again",
                    entry["worker"], task["kwargs"].get("shard_id"), entry["job_id"])
        app.send_task(TASK_PROCESS_SHARD, kwargs=task["kwargs"], queue=task.get("queue"))
        telemetry.SHARDS.labels("resent").inc()
        sent += 1
    # windowed jobs: shards a dead sender took, then whatever fits (a job with idle workers moves)
    sent += window.reap_windows(client, app, stale_s=settings().worker_stale_s)
    return sent


def start_reaper(app, worker: str) -> threading.Event:
    """A daemon thread reaping every ``CUTOUT_REAP_INTERVAL`` s; set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        client = redis.Redis.from_url(redis_url())
        while not stop.wait(settings().reap_interval):
            try:
                progress.worker_seen(client, worker)  # alive, even when idle
                reap_once(client, app, worker)
            except RedisError as exc:  # the broker is down: nothing to reap into either
                log.warning("liveness check skipped: %s", exc)
            except Exception:  # a reaper that dies silently would bring back the 3-hour wait
                log.exception("liveness check failed; trying again in %.0f s", settings().reap_interval)

    threading.Thread(target=loop, name="cutout-reaper", daemon=True).start()
    return stop
