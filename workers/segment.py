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

import contextlib
import os
import threading
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from cutout.jobs.errors import ConfigError, OutOfMemoryError
from cutout.jobs.settings import settings
from cutout.jobs.spec import PipelineOptions

RUNTIMES = ("auto", "torch", "onnxruntime")


@runtime_checkable
class Segmenter(Protocol):
    name: str
    device: str

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxWx3 RGB images → float32 HxW foreground probabilities in 0..1."""
        ...


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
        settings().models_dir,
    )


# --- device, runtime, threads -----------------------------------------------------------------
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def runtime_setting() -> str:
    value = settings().runtime
    if value not in RUNTIMES:
        raise ConfigError(f"CUTOUT_RUNTIME={value!r}: expected one of {', '.join(RUNTIMES)}")
    return value


def choose_runtime(device: str, requested: str | None = None) -> str:
    """auto → torch on CUDA; on CPU onnxruntime when importable (about 2x faster), else torch."""
    requested = requested or runtime_setting()
    if requested != "auto":
        if requested == "onnxruntime" and device != "cpu":
            raise ConfigError("runtime onnxruntime runs on CPU only here; use torch for CUDA")
        return requested
    if device != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def cpu_threads() -> int:
    value = settings().threads
    if value:
        return max(1, int(value))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def max_batch(device: str) -> int:
    value = settings().seg_batch
    return max(1, int(value)) if value else (8 if device.startswith("cuda") else 1)


# --- shared pre/post-processing ---------------------------------------------------------------
def to_square_batch(
    images: list[np.ndarray], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """Resize each image to size×size, scale to 0..1, normalise: float32 N×3×size×size."""
    import cv2

    check_images(images)
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    for index, image in enumerate(images):
        shrinking = max(image.shape[:2]) > size
        resized = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        batch[index] = (resized.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean_arr) / std_arr
    return batch


def to_original_sizes(probabilities: np.ndarray, images: list[np.ndarray]) -> list[np.ndarray]:
    """N×h×w probabilities → one float32 mask per image at its own size, clipped to 0..1."""
    import cv2

    masks = []
    for probability, image in zip(probabilities, images):
        height, width = image.shape[:2]
        mask = cv2.resize(np.ascontiguousarray(probability, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        masks.append(np.clip(mask, 0.0, 1.0).astype(np.float32, copy=False))
    return masks


def check_images(images: list[np.ndarray]) -> None:
    for image in images:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"segmenters take uint8 HxWx3 RGB images, got {image.dtype} {image.shape}")


def in_chunks(batch: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(batch), size):
        yield batch[start : start + size]


def run_chunked(forward: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, chunk: int) -> np.ndarray:
    """Apply ``forward`` (N×3×S×S → N×S×S) chunk by chunk and stack the results."""
    if len(batch) == 0:
        return np.empty((0,) + batch.shape[2:], dtype=np.float32)
    return np.concatenate([forward(part) for part in in_chunks(batch, chunk)], axis=0)


@contextlib.contextmanager
def translate_oom(device: str, what: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory into the typed, retryable ``OutOfMemoryError``."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemoryError(f"{what} ran out of memory on {device}: {exc}".splitlines()[0]) from exc
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        raise OutOfMemoryError(f"{what} ran out of memory on {device}: {exc}".splitlines()[0]) from exc


def prepare_torch(device: str) -> None:
    """Per-process torch settings for inference."""
    import torch

    if device == "cpu" and settings().threads:
        torch.set_num_threads(cpu_threads())
