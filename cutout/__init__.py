"""cutout: background removal at dataset scale.

The installed package has two halves under one namespace: ``cutout.jobs`` (the submitter:
spec, sources, storage, manifest; never imports torch) and ``cutout.workers`` (the image
pipeline and the Celery worker). This module is the public face; it imports the heavy worker
half only when a worker-side name is first used, so ``import cutout`` stays cheap.
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "remove_background"]


def __getattr__(name: str):
    """Lazy public names: ``cutout.remove_background`` loads the pipeline on first use."""
    if name == "remove_background":
        from cutout.workers.pipeline import remove_background

        return remove_background
    raise AttributeError(f"module 'cutout' has no attribute {name!r}")
