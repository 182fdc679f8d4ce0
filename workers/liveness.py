"""Shards held by dead machines come back in about a minute, not after the visibility timeout.

A SIGKILLed worker, or a machine that lost power, leaves its shard's message unacked in Redis,
where kombu hands it out again only after the visibility timeout (3 hours by default, since it
must exceed the slowest shard). Each task records the shard it holds (``cutout.jobs.progress``
``hold_shard``) and its heartbeat thread beats every 5 s; every live worker runs a reaper that,
under a Redis lock so one reaps at a time, re-sends the shard of any worker silent for
``CUTOUT_WORKER_STALE_S`` (60 s), and any shard message delivered that long ago that no worker
notes it holds (its receiver died in the milliseconds between taking the message and noting
the hold: ``claim_orphaned_deliveries``). The old message, redelivered hours later, finds the shard's
done-marker and is skipped; a false alarm (a worker frozen for a minute) costs duplicate work,
never a duplicate record: outputs are idempotent and a shard is counted once. The same
sweep keeps every job's bounded window of shard messages topped up (``cutout.jobs.window``).
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from datetime import datetime

import redis
from redis.exceptions import RedisError

from cutout.jobs import progress, window
from cutout.jobs.queue import TASK_PROCESS_SHARD, redis_url, visibility_timeout_s
from cutout.jobs.settings import settings
from cutout.workers import telemetry

log = logging.getLogger(__name__)

LOCK_KEY = "cutout:reaper:lock"
ORPHAN_KEY = "cutout:orphan"  # :<delivery tag> -> a delivered message already sent again
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"  # kombu's Redis transport, its defaults


def reap_once(client, app, worker: str) -> int:
    """Re-send the shards of silent workers, if this worker gets the lock; how many were sent."""
    if not client.set(LOCK_KEY, worker, nx=True, ex=max(1, int(settings().reap_interval))):
        return 0
    sent = 0
    for entry in progress.claim_stale_holds(client):
        task = entry["task"]
        if task.get("tag"):  # its message is sent again here, not as an orphan below
            client.set(f"{ORPHAN_KEY}:{task['tag']}", "1", ex=visibility_timeout_s())
        log.warning("worker %s holding shard %s of job %s stopped beating; sending the shard again",
                    entry["worker"], task["kwargs"].get("shard_id"), entry["job_id"])
        sent += _send_again(app, task["kwargs"], task.get("queue"))
    for kwargs, queue in claim_orphaned_deliveries(client, stale_s=settings().worker_stale_s):
        log.warning("shard %s of %s was delivered to a worker that stopped before taking it up; "
                    "sending the shard again", kwargs.get("shard_id"), kwargs.get("job_prefix"))
        sent += _send_again(app, kwargs, queue)
    # windowed jobs: shards a dead sender took, then whatever fits (a job with idle workers moves)
    sent += window.reap_windows(client, app, stale_s=settings().worker_stale_s)
    return sent


def _send_again(app, kwargs: dict, queue: str | None) -> int:
    app.send_task(TASK_PROCESS_SHARD, kwargs=kwargs, queue=queue)
    telemetry.SHARDS.labels("resent").inc()
    return 1


def claim_orphaned_deliveries(client, *, stale_s: float, now: float | None = None) -> list[tuple[dict, str]]:
    """(kwargs, queue) of shard messages delivered over ``stale_s`` ago that no worker holds
    (by the broker's delivery tag).

    A worker notes its hold a few milliseconds after the broker hands it the message; killed in
    between, it leaves the message unacked with no hold, and kombu would hand it out again only
    after the visibility timeout (hours). Delivered messages live in kombu's ``unacked_index``
    (delivery time) and ``unacked`` (the message) while unacknowledged: as many as there are
    busy worker processes, whatever the job's size. Each orphan is claimed once (a marker that
    lives as long as the visibility timeout); its late redelivery finds the shard done."""
    now = time.time() if now is None else now
    orphans = []
    held = None
    for raw_tag in client.zrangebyscore(UNACKED_INDEX_KEY, "-inf", now - stale_s):
        tag = raw_tag.decode() if isinstance(raw_tag, bytes) else raw_tag
        shard = _shard_message(client.hget(UNACKED_KEY, tag), after=now - stale_s)
        if shard is None:
            continue
        held = progress.held_deliveries(client) if held is None else held
        if tag in held:
            continue
        if client.set(f"{ORPHAN_KEY}:{tag}", "1", nx=True, ex=visibility_timeout_s()):
            orphans.append(shard)
    return orphans


def _shard_message(raw, *, after: float) -> tuple[dict, str] | None:
    """(kwargs, queue) of a shard task in kombu's stored form ``[message, exchange, routing
    key]`` (a Celery protocol-2 message: base64 JSON ``[args, kwargs, embed]``); None for any
    other message, anything unreadable, and a retry whose countdown (its ``eta``) ends after
    ``after``: a worker keeps such a message unacked, on purpose, until then."""
    try:
        message, _exchange, routing_key = json.loads(raw)
        headers = message["headers"]
        if headers["task"] != TASK_PROCESS_SHARD:
            return None
        if headers.get("eta") and datetime.fromisoformat(headers["eta"]).timestamp() > after:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return kwargs, routing_key
    except (TypeError, ValueError, KeyError):
        return None


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
