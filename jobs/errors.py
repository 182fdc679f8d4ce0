"""Typed errors shared by both halves.

Every failure that reaches a manifest record is a ``CutoutError`` subclass, so the record can
say which stage failed, why, and whether retrying could ever help (``permanent``).
"""
from __future__ import annotations

from cutout.jobs.redact import redact


class CutoutError(Exception):
    """Base class: ``stage`` names the pipeline stage, ``permanent`` says retrying is useless."""

    stage: str = "unknown"
    permanent: bool = True

    def __init__(self, message: str, *, stage: str | None = None):
        super().__init__(redact(str(message)))  # no password or signature reaches a record or log
        if stage is not None:
            self.stage = stage

    @property
    def error_class(self) -> str:
        return type(self).__name__


class ConfigError(CutoutError, ValueError):
    """Settings that contradict each other or name something that does not exist."""

    stage = "config"


# --- decode ----------------------------------------------------------------------------------
class DecodeError(CutoutError):
    """The bytes are not an image we can read (empty, truncated, corrupt, not an image)."""

    stage = "decode"


class EmptyInputError(DecodeError):
    """Zero bytes."""


class TruncatedImageError(DecodeError):
    """The header parsed but the pixel data ends early."""


class NotAnImageError(DecodeError):
    """No known image signature."""


class UnsupportedImageError(DecodeError):
    """An image, but in a mode or format we refuse (documented in workers/decode.py)."""


class ImageTooLargeError(DecodeError):
    """More pixels than ``max_pixels`` (or a decompression bomb)."""


# --- models ----------------------------------------------------------------------------------
class ModelError(CutoutError):
    stage = "segment"


class MissingWeightsError(ModelError):
    """Weights are not on disk; the message names the command that fetches them."""


class WeightsChecksumError(ModelError):
    """Weights on disk do not match the sha256 in their spec."""


class OutOfMemoryError(ModelError):
    """The device ran out of memory; transient for the item (retry smaller or on CPU)."""

    permanent = False


class WorkerCrashError(CutoutError):
    """The worker process died (native crash, OOM killer) each time this input was on the model
    alone; it is recorded instead of taking its shard down with it forever."""

    stage = "pipeline"


class WorkerError(CutoutError):
    """The shard failed on an unexpected error (a bug, a broken install) every time it was
    tried; its inputs are recorded with this so the job still completes and can be retried."""

    stage = "worker"


# --- storage ---------------------------------------------------------------------------------
class StorageError(CutoutError):
    stage = "storage"


class TransientStorageError(StorageError):
    """5xx, SlowDown, timeouts, connection resets: retry with backoff."""

    permanent = False


class NotFoundError(StorageError):
    """The object or file does not exist."""


class InputTooLargeError(StorageError):
    """The object is bigger than the configured byte cap."""


class UnsafeKeyError(StorageError):
    """An output key would escape the destination prefix."""


class OutputWriteError(StorageError):
    """This input's output cannot be written (a name the file system refuses, a denied or
    failed write); recorded for the item, its neighbours are written as usual."""

    stage = "write"


# --- matting / encoding ------------------------------------------------------------------------
class MattingError(CutoutError):
    """The matting solver failed; the pipeline falls back to the soft mask and records a note."""

    stage = "matte"


class EncodeError(CutoutError):
    """The array cannot be written in the requested format (e.g. RGBA as JPEG)."""

    stage = "encode"


# --- services ----------------------------------------------------------------------------------
class ServiceUnavailableError(CutoutError):
    """Redis (broker or live progress) cannot be reached; the CLI exits 5 with a hint."""

    stage = "queue"
    permanent = False


# --- hostile inputs and forged messages (appended) -----------------------------------------------
class NotARegularFileError(StorageError):
    """A named pipe, socket or device where a file was expected: refused, never read (a read
    from a pipe would block the worker forever, one from /dev/zero would never end)."""


class SourceNotAllowedError(StorageError):
    """The input is outside the worker's allowlist of sources (``CUTOUT_ALLOWED_SOURCES``), or
    an HTTP request or redirect goes to a loopback, private or link-local address."""

    stage = "read"


class InvalidIdError(CutoutError):
    """A job or shard id that the submitter could not have produced (a forged or corrupt task
    message): refused before anything is read or written."""

    stage = "task"


class CorruptImageError(DecodeError):
    """An image by its signature, but damaged (bad checksum, broken header or pixel stream) or
    holding no usable pixel value (a float image that is all NaN/Inf)."""


# --- box hints ---------------------------------------------------------------------------------
class InvalidBoxError(CutoutError):
    """A box hint that names no pixels of its image: empty, inverted, or outside the image.
    Recorded for that one object; the image's other boxes are cut out as usual."""

    stage = "box"
