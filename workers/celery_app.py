"""The worker's Celery app: ``celery -A cutout.workers.celery_app worker`` (or ``cutout worker``).

Configuration comes from ``cutout.jobs.queue`` so the submitter and the workers cannot disagree.
Each pool process pins itself to one GPU when the worker was started with a GPU list, and
the worker's main process runs the reaper that re-sends shards held by dead workers.
"""
from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init, worker_ready

from cutout.jobs.queue import make_app
from cutout.jobs.settings import settings

log = logging.getLogger(__name__)

app = make_app(include=("cutout.workers.tasks",))


@worker_ready.connect
def _start_reaper(sender=None, **_kwargs) -> None:
    """Every live worker watches for dead ones (see cutout.workers.liveness)."""
    from cutout.workers.liveness import start_reaper

    start_reaper(app, getattr(sender, "hostname", None) or f"worker:{os.getpid()}")


@worker_process_init.connect
def _pin_gpu(**_kwargs) -> None:
    """One pool process per GPU: the i-th child sees only the i-th GPU (before torch starts CUDA)."""
    gpus = [g for g in settings().worker_gpus.split(",") if g]
    if not gpus:
        return
    from billiard.process import current_process

    index = getattr(current_process(), "index", 0) or 0
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    log.info("pool process %s pinned to GPU %s", index, os.environ["CUDA_VISIBLE_DEVICES"])
