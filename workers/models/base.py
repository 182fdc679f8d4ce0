"""What every segmenter shares: device, runtime and batch settings, out-of-memory handling, and
``BatchedSegmenter`` (resize → normalise → forward in batches → resize back).

Model files build on this module; nothing here imports a model file or ``workers/segment.py``
(that stage module only owns the per-process cache), so there is no import cycle.

Knobs (environment, not job options, because they change speed, not pixels):
``CUTOUT_RUNTIME`` auto|torch|onnxruntime, ``CUTOUT_THREADS`` (CPU threads),
``CUTOUT_SEG_BATCH`` (images per forward pass; default 8 on CUDA, 1 on CPU).
A CUDA out-of-memory becomes ``cutout.jobs.errors.OutOfMemoryError``; callers retry with a smaller
``seg_size`` or ``device="cpu"`` (see ``cutout.workers.pipeline.Pipeline.segment``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from cutout.jobs.errors import ConfigError, OutOfMemoryError
from cutout.jobs.settings import DEVICE_PATTERN, settings

RUNTIMES = ("auto", "torch", "onnxruntime")


@runtime_checkable
class Segmenter(Protocol):
    name: str
    device: str

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 HxWx3 RGB images → float32 HxW foreground probabilities in 0..1."""
        ...


class BatchedSegmenter:
    """A network segmenter: each image is resized to the network's input shape (``input_hw``;
    a square of ``input_size`` unless a subclass says otherwise), normalised, and images of one
    shape go through ``forward`` together, ``batch_size`` at a time; each output is
    post-processed (``finish``) and resized back to its image's size.

    ``forward`` (float32 N×3×H×W → N×H×W) is given (a graph runner, ``onnx_session``) or
    overridden; ``mean``/``std`` (on 0..1 pixels) come from the spec's weights."""

    name: str
    device: str
    runtime: str = "torch"
    input_size: int
    batch_size: int = 1
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __init__(self, spec, input_size: int, device: str, runtime: str = "torch", forward=None):
        self.name = spec.name
        self.weights = spec.weights
        if spec.weights is not None:
            self.mean, self.std = spec.weights.mean, spec.weights.std
        self.input_size = input_size
        self.device = device
        self.runtime = runtime
        self.batch_size = max_batch(device)
        if forward is not None:
            self.forward = forward  # shadows the method

    def forward(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        return self.input_size, self.input_size

    def normalise(self, resized: np.ndarray) -> np.ndarray:
        """uint8 h×w×3 → float32 3×h×w: ``(x/255 - mean) / std``."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (resized.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std

    def finish(self, probability: np.ndarray) -> np.ndarray:
        """Per-image post-processing of the network output, before resizing back."""
        return probability

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        check_images(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(self.input_hw(image), []).append(index)
        masks: list[np.ndarray | None] = [None] * len(images)
        for (height, width), indices in groups.items():
            batch = np.stack([self.normalise(resized_to(images[i], height, width)) for i in indices])
            with translate_oom(self.device, f"{self.name} at {width}x{height}px"):
                probabilities = run_chunked(self.forward, batch, self.batch_size)
            for index, probability in zip(indices, probabilities):
                masks[index] = to_original_size(self.finish(probability), images[index])
        return masks  # type: ignore[return-value]


# --- device, runtime, threads -----------------------------------------------------------------
def check_device(device: str | None) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and a CUDA device only where torch sees one: checked
    before a run writes anything, so a typo is one line, not a failed record per input."""
    if device is None:
        return
    if not DEVICE_PATTERN.match(device):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N (or leave it out: cuda when present)")
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here; "
                          "use --device cpu (or leave it out)")
    if index >= count:
        raise ConfigError(f"device {device!r}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")


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
        if requested == "onnxruntime" and device != "cpu" and not onnxruntime_has_cuda():
            raise ConfigError("runtime onnxruntime runs on CPU only here (no CUDAExecutionProvider); use torch")
        return requested
    if device != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnxruntime"


def onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def cpu_threads() -> int:
    value = settings().threads
    if value:
        return max(1, int(value))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def max_batch(device: str) -> int:
    value = settings().seg_batch
    return max(1, int(value)) if value else (8 if device.startswith("cuda") else 1)


def prepare_torch(device: str) -> None:
    """Per-process torch settings for inference."""
    import torch

    if device == "cpu" and settings().threads:
        torch.set_num_threads(cpu_threads())


# --- shared pre/post-processing ---------------------------------------------------------------
def resized_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` at width×height: area averaging when shrinking, bilinear when enlarging."""
    import cv2

    shrinking = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def to_square_batch(
    images: list[np.ndarray], size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """Resize each image to size×size, scale to 0..1, normalise: float32 N×3×size×size."""
    check_images(images)
    batch = np.empty((len(images), 3, size, size), dtype=np.float32)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    for index, image in enumerate(images):
        resized = resized_to(image, size, size)
        batch[index] = (resized.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean_arr) / std_arr
    return batch


def to_original_size(probability: np.ndarray, image: np.ndarray) -> np.ndarray:
    """An h×w probability map → float32 at ``image``'s size, clipped to 0..1."""
    import cv2

    height, width = image.shape[:2]
    mask = cv2.resize(np.ascontiguousarray(probability, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(mask, 0.0, 1.0).astype(np.float32, copy=False)


def to_original_sizes(probabilities: np.ndarray, images: list[np.ndarray]) -> list[np.ndarray]:
    """N×h×w probabilities → one float32 mask per image at its own size, clipped to 0..1."""
    return [to_original_size(probability, image) for probability, image in zip(probabilities, images)]


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
    except RuntimeError as exc:  # torch's older message, and onnxruntime's CUDA arena
        text = str(exc).lower()
        if "out of memory" not in text and "failed to allocate memory" not in text:
            raise
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        raise OutOfMemoryError(f"{what} ran out of memory on {device}: {exc}".splitlines()[0]) from exc
