"""Segment stage: a batch of RGB images → soft foreground masks, through the model registry.

A ``Segmenter`` turns ``uint8 HxWx3`` RGB images into ``float32 HxW`` foreground probabilities
(0..1) at each image's original size. ``get_segmenter`` builds one per process per settings,
lazily, on first use, and keeps it (loading IS-Net takes seconds; a worker reuses it for
every shard). Models resize every image to one square input, so a batch is one tensor.

Knobs (environment, not job options, because they change speed, not pixels):
``CUTOUT_RUNTIME`` auto|torch|onnxruntime, ``CUTOUT_THREADS`` (CPU threads),
``CUTOUT_SEG_BATCH`` (images per forward pass; default 8 on CUDA, 1 on CPU).
A CUDA out-of-memory becomes ``cutout.jobs.errors.OutOfMemoryError``; callers retry with a smaller
``seg_size`` or ``device="cpu"`` (see ``cutout.workers.pipeline.Pipeline.segment``).
"""
from __future__ import annotations

import os
import threading

from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.base import (  # noqa: F401  (re-exported: older callers import them from here)
    RUNTIMES,
    Segmenter,
    check_images,
    choose_runtime,
    cpu_threads,
    default_device,
    max_batch,
    prepare_torch,
    run_chunked,
    runtime_setting,
    to_original_sizes,
    to_square_batch,
    translate_oom,
)


_cache: dict[tuple, Segmenter] = {}
_cache_lock = threading.Lock()


def get_segmenter(options: PipelineOptions, device: str | None = None) -> Segmenter:
    """The process-wide segmenter for these settings, built on first use."""
    device = device or default_device()
    key = _cache_key(options, device)
    with _cache_lock:
        segmenter = _cache.get(key)
        if segmenter is None:
            from cutout.workers.models.registry import build_segmenter

            segmenter = build_segmenter(options, device)
            _cache[key] = segmenter
    return segmenter


def clear_segmenter_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _cache_key(options: PipelineOptions, device: str) -> tuple:
    return (
        options.model,
        options.weights,
        device,
        options.classes,
        options.seg_size,
        options.score_threshold,
        runtime_setting(),
        os.environ.get("CUTOUT_MODELS_DIR"),
    )
