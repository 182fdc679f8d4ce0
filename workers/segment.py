"""Segment stage: a batch of RGB images → soft foreground masks, through the model registry.

A ``Segmenter`` turns ``uint8 HxWx3`` RGB images into ``float32 HxW`` foreground probabilities
(0..1) at each image's original size. ``get_segmenter`` builds one lazily, on first use, and
keeps it for the job in hand (``cutout.workers.models.cache``: loading IS-Net takes seconds; a
worker reuses it for every shard, and frees it when it moves to another job). What segmenters
share (batching, device, runtime, out-of-memory) lives in ``cutout.workers.models.base``.
"""
from __future__ import annotations

from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.cache import MODEL_CACHE
from cutout.workers.models.base import Segmenter, cpu_threads, default_device  # noqa: F401  (callers' names)


def get_segmenter(options: PipelineOptions, device: str | None = None) -> Segmenter:
    """The process-wide segmenter for these settings, built on first use (see ``MODEL_CACHE``)."""
    return MODEL_CACHE.segmenter(options, device)


def clear_segmenter_cache() -> None:
    MODEL_CACHE.clear()
