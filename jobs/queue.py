"""The queue contract shared by the submitter and the workers: broker settings, task names and
the reliability policy (its one definition: ``celery_config`` and ``ReliableTask``).

The submitter builds a light Celery app from this module and sends tasks *by name*, so it
never imports ``workers`` (or torch). ``cutout.workers.celery_app`` builds the worker's app from the
same configuration, so both sides always agree on serialisation, queues and timeouts. The
configuration is read from the environment when the app first needs it, not at import.
"""
from __future__ import annotations

from functools import lru_cache

from celery import Celery, Task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cutout.jobs.errors import OutOfMemoryError, TransientStorageError
from cutout.jobs.settings import settings

TASK_PROCESS_SHARD = "cutout.process_shard"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "cutout"
# Longer than the slowest shard: a message not acked by then is handed to another worker.
DEFAULT_VISIBILITY_TIMEOUT_S = 3 * 3600


def broker_url() -> str:
    return settings().broker_url


def redis_url() -> str:
    """Where live progress lives; the broker's Redis unless told otherwise."""
    return settings().redis_url or broker_url()


def visibility_timeout_s() -> int:
    return settings().visibility_timeout


def transport_options() -> dict:
    """Redis transport: visibility timeout, and how often workers sweep for abandoned messages.

    kombu sweeps every ``interval × throttle`` seconds (100 s by default); a short visibility
    timeout (tests) wants a short sweep too: CUTOUT_UNACKED_RESTORE_INTERVAL / _THROTTLE.
    """
    options: dict = {"visibility_timeout": visibility_timeout_s()}
    for key in ("unacked_restore_interval", "unacked_restore_throttle"):
        if getattr(settings(), key):
            options[key] = getattr(settings(), key)
    return options


# Errors a shard task retries automatically (with backoff, up to CUTOUT_TASK_MAX_RETRIES times);
# any other exception is permanent for the shard or handled by the task itself.
TRANSIENT_ERRORS = (TransientStorageError, OutOfMemoryError, RedisConnectionError, RedisTimeoutError)


class ReliableTask(Task):
    """The task half of the reliability policy: typed transient errors retried with jittered
    exponential backoff and a cap (acks-late and reject-on-worker-lost come from ``celery_config``)."""

    autoretry_for = TRANSIENT_ERRORS
    retry_backoff = 2
    retry_backoff_max = 300
    retry_jitter = True

    @property
    def max_retries(self) -> int:  # read at each retry, so the environment of the worker counts
        return settings().task_max_retries


def celery_config(broker: str | None = None) -> dict:
    """One reliability policy for every process that talks to the broker."""
    return {
        "broker_url": broker or broker_url(),
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options(),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,  # the manifest in the destination is the result
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": settings().task_events,  # for Flower
        "worker_max_tasks_per_child": settings().max_tasks_per_child,
    }


def make_app(broker: str | None = None, *, include: tuple[str, ...] = ()) -> Celery:
    app = Celery("cutout", include=list(include))
    app.add_defaults(lambda: celery_config(broker))  # read when first needed, not at import
    return app


@lru_cache(maxsize=4)
def submitter_app(broker: str) -> Celery:
    """A Celery app that knows no tasks: it only sends them by name."""
    return make_app(broker)


def send_process_shard(
    app: Celery,
    job_prefix: str,
    shard_id: str,
    *,
    queue: str,
    redo_failed: bool = False,
    error_class: str | None = None,
    inputs: list[str] | None = None,
    producer=None,
) -> None:
    """Enqueue one shard; the message carries references only, never image bytes (a retry
    names the failed input URIs to redo)."""
    kwargs: dict = {"job_prefix": job_prefix, "shard_id": shard_id}
    if redo_failed:
        kwargs["redo_failed"] = True
        kwargs["error_class"] = error_class
        kwargs["inputs"] = inputs
    app.send_task(TASK_PROCESS_SHARD, kwargs=kwargs, queue=queue, producer=producer)
