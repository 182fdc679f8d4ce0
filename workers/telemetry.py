"""Prometheus metrics of a worker, observed from what each shard task returns and records.

Every process that runs shards counts into prometheus_client's multiprocess store (one set of
mmap files per process under ``PROMETHEUS_MULTIPROC_DIR``, which ``cutout worker`` sets before
anything imports prometheus_client), and the worker's main process serves ``/metrics``, adding
them up across its pool: one port per worker, whatever the pool (``solo`` runs tasks in the main
process, ``prefork`` in forked children; both write the same store). Queue depth and the
number of pool processes are read when scraped. Metrics never fail a shard: each observation
is best effort.

Busy share of a worker: ``rate(cutout_worker_busy_seconds_total[5m]) / cutout_worker_processes``.
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from cutout.jobs.settings import settings

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108
_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LONG_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

ITEMS = Counter("cutout_items", "Inputs recorded, by status and error class (empty unless failed)",
                ["status", "error_class"])
STAGE_SECONDS = Histogram("cutout_stage_seconds", "Seconds one input spent in a pipeline stage",
                          ["stage"], buckets=_STAGE_BUCKETS)
SHARD_SECONDS = Histogram("cutout_shard_seconds", "Seconds from a shard's start to its records",
                          buckets=_LONG_BUCKETS)
SHARDS = Counter("cutout_shards", "Shard tasks by outcome: processed, skipped, retried, "
                 "recorded_failed (inputs recorded WorkerError/TransientStorageError), "
                 "resent (the shard of a dead worker, sent again)", ["outcome"])
MODEL_LOAD_SECONDS = Histogram("cutout_model_load_seconds",
                               "Seconds to load a configuration's models, once per process",
                               buckets=_LONG_BUCKETS)
BUSY_SECONDS = Counter("cutout_worker_busy_seconds", "Seconds pool processes spent in shard tasks")

_loaded_configs: set[str] = set()


def observe_shard(run, records) -> None:
    """Count a processed shard from its stats and its records (the per-input timings)."""
    stats = run.stats
    SHARDS.labels("processed").inc()
    SHARD_SECONDS.observe(max(0.0, stats.finished_at - stats.started_at))
    classified = 0
    for error_class, number in stats.error_classes.items():
        ITEMS.labels("failed", error_class).inc(number)
        classified += number
    for status, number in stats.counts.items():
        unexplained = number - classified if status == "failed" else number
        if unexplained > 0:
            ITEMS.labels(status, "UnknownError" if status == "failed" else "").inc(unexplained)
    for record in records:
        for stage, seconds in record.timings.items():
            STAGE_SECONDS.labels(stage).observe(seconds)


def load_models_timed(spec) -> None:
    """Load the job's models before the shard (the first time in this process), timing it.

    A load that fails is left for the shard to meet and record per input.
    """
    key = spec.pipeline.config_hash()
    if key in _loaded_configs:
        return
    from cutout.workers.shard import get_pipeline

    try:
        seconds = get_pipeline(spec).load_models()
    except Exception as exc:  # noqa: BLE001 - the shard records it, typed, per input
        log.warning("model load failed before the shard (%s); the shard will record it", type(exc).__name__)
        return
    _loaded_configs.add(key)
    MODEL_LOAD_SECONDS.observe(seconds)


# --- the exporter (the worker's main process) --------------------------------------------------
class WorkerCollector:
    """Read on each scrape: messages waiting in each queue, unacked messages, pool size."""

    def __init__(self, broker_url: str, queues: list[str], processes: int):
        self.broker_url = broker_url
        self.queues = queues
        self.processes = processes
        self._client = None

    def collect(self):
        processes = GaugeMetricFamily("cutout_worker_processes", "Pool processes of this worker")
        processes.add_metric([], self.processes)
        yield processes
        try:
            depths, unacked = self._read_broker()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even with the broker down
            log.debug("queue depth not read: %s", type(exc).__name__)
            return
        depth = GaugeMetricFamily("cutout_queue_depth", "Shard messages waiting in the queue",
                                  labels=["queue"])
        for queue, number in depths.items():
            depth.add_metric([queue], number)
        yield depth
        waiting = GaugeMetricFamily("cutout_unacked_messages",
                                    "Messages delivered to a worker and not acknowledged yet")
        waiting.add_metric([], unacked)
        yield waiting

    def _read_broker(self) -> tuple[dict[str, int], int]:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.broker_url, socket_timeout=2)
        pipe = self._client.pipeline()
        for queue in self.queues:  # kombu keeps one list per priority step
            for key in [queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)]:
                pipe.llen(key)
        pipe.hlen("unacked")
        lengths = pipe.execute()
        depths = {queue: sum(lengths[i * 4 : i * 4 + 4]) for i, queue in enumerate(self.queues)}
        return depths, int(lengths[-1])


def start_exporter(port: int, *, broker_url: str, queues: list[str], processes: int,
                   addr: str | None = None) -> bool:
    """Serve /metrics on ``port``; False (and one warning) when the port is taken."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(WorkerCollector(broker_url, queues, processes))
    addr = addr or settings().metrics_addr
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("metrics not served: port %s: %s (set --metrics-port or CUTOUT_METRICS_PORT)", port, exc)
        return False
    log.info("metrics on http://%s:%s/metrics", addr, port)
    return True
