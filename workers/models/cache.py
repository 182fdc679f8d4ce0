"""The per-process cache: the segmenters and pipelines of the job in hand, and nothing else.

Loading a network takes seconds, so a process keeps what its current job uses (IS-Net at its
ensemble sizes, both halves of a fused model, a smaller copy after an out-of-memory) and reuses
it for every shard of that job, every ``cutout.remove_background`` call, every ``Session``.
When a request comes from another job (settings differing in anything but ``seg_size``),
every loaded model and pipeline is dropped first, and CUDA's cached blocks are returned: a
worker that switches jobs holds one job's models, never two. Pipelines are light (options, a
decoded ``image:`` background) and keyed by the full settings; the last few are kept.

Builders that need other models (a fusion's components) ask ``component``: same job, no drop.
"""
from __future__ import annotations

import gc
import sys
import threading

from cutout.jobs.settings import settings
from cutout.workers.models.base import Segmenter, default_device, runtime_setting


def entry_key(options, device: str) -> tuple:
    """Everything that changes the loaded model."""
    return job_key(options) + (options.seg_size, device)


def job_key(options) -> tuple:
    """What names one job's models: the settings minus the input size (which the pipeline's
    ensemble and out-of-memory fallback vary) and the device (the CPU fallback)."""
    return (
        options.model,
        options.weights,
        options.classes,
        options.select_by,  # the class model loaded beside (workers/select.py)
        options.score_threshold,
        options.fusion,
        options.model_sizes,
        runtime_setting(),
        settings().models_dir,
    )


class ModelCache:
    PIPELINES_KEPT = 8  # pipelines of one job that differ in output settings only

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a fusion's build asks for its components
        self._job: tuple | None = None
        self._entries: dict[tuple, Segmenter] = {}
        self._pipelines: dict[tuple, object] = {}

    def segmenter(self, options, device: str | None = None) -> Segmenter:
        """The segmenter for these settings, built on first use; another job's are freed first."""
        with self._lock:
            self._enter(job_key(options))
            return self.component(options, device)

    def pipeline(self, options, device: str | None = None):
        """The ``Pipeline`` for these settings, made on first use (its models load on first
        need, through ``segmenter``); another job's models and pipelines are freed first."""
        from cutout.workers.pipeline import Pipeline

        with self._lock:
            self._enter(job_key(options))
            key = (options.config_hash(), device)
            pipeline = self._pipelines.pop(key, None) or Pipeline(options, device=device)
            self._pipelines[key] = pipeline  # the most recent last
            while len(self._pipelines) > self.PIPELINES_KEPT:
                self._pipelines.pop(next(iter(self._pipelines)))
            return pipeline

    def _enter(self, job: tuple) -> None:
        if job != self._job:
            self._drop_all()
            self._job = job

    def component(self, options, device: str | None = None) -> Segmenter:
        """Like ``segmenter`` but within the job in hand (for builders that load other models)."""
        from cutout.workers.models.registry import build_segmenter

        device = device or default_device()
        key = entry_key(options, device)
        with self._lock:
            if key not in self._entries:
                self._entries[key] = build_segmenter(options, device)
            return self._entries[key]

    def loaded(self) -> list[str]:
        """Names of the loaded segmenters (for logs and tests)."""
        with self._lock:
            return [segmenter.name for segmenter in self._entries.values()]

    def clear(self) -> None:
        with self._lock:
            self._drop_all()
            self._job = None

    def _drop_all(self) -> None:
        self._pipelines.clear()
        if not self._entries:
            return
        self._entries.clear()
        gc.collect()  # sessions and modules hold large buffers; free them now, not eventually
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


MODEL_CACHE = ModelCache()
