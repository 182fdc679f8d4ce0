"""cutout: background removal at dataset scale.

The installed package has two halves under one namespace: ``cutout.jobs`` (the submitter:
spec, sources, storage, manifest; never imports torch) and ``cutout.workers`` (the image
pipeline and the Celery worker). This module is the public face; it imports the heavy worker
half only when a worker-side name is first used, so ``import cutout`` stays cheap.
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "remove_background", "Session", "CutoutResult", "CutoutError"]

_WORKER_NAMES = {
    "remove_background": "cutout.workers.api",
    "Session": "cutout.workers.api",
    "CutoutResult": "cutout.workers.pipeline",
    "CutoutError": "cutout.jobs.errors",
}


def __getattr__(name: str):
    """Lazy public names: the first use of ``cutout.remove_background`` loads the pipeline."""
    module_name = _WORKER_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cutout' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
