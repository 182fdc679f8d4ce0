"""Bytes in and out of local paths, ``file://``, ``s3://`` and (read-only) ``http(s)://``.

Everyone else calls only the functions at the top of this module. Errors are typed:
``NotFoundError`` (missing), ``InputTooLargeError`` (over ``max_bytes``),
``TransientStorageError`` (5xx, throttling, timeouts, resets; raised only after our own
retries with exponential backoff and jitter are exhausted), ``NotARegularFileError`` (a pipe,
socket or device: never opened for a blocking read), ``SourceNotAllowedError`` (outside a
worker's allowlist, cutout.jobs.allowlist) and ``StorageError`` (the rest).

Writes are atomic: a local write goes to a temp file in the same folder and is renamed into
place; an S3 PUT is atomic by itself (multipart above ``CUTOUT_S3_MULTIPART_THRESHOLD``).

Tuning (environment, read at call time):
  CUTOUT_STORAGE_RETRIES          attempts per call, default 6
  CUTOUT_STORAGE_RETRY_MAX_S      total seconds spent retrying one call, default 60
  CUTOUT_STORAGE_BACKOFF_S        first backoff delay, default 0.25 (doubles, jittered, max 10 s)
  CUTOUT_STORAGE_CONNECT_TIMEOUT  seconds, default 5
  CUTOUT_STORAGE_READ_TIMEOUT     seconds, default 60
  CUTOUT_STORAGE_HTTP_DEADLINE    total seconds for one HTTP request, default 4 × the read timeout
  CUTOUT_S3_MULTIPART_THRESHOLD   bytes, default 64 MiB
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import logging
import os
import random
import re
import secrets
import socket
import stat
import threading
import time
import http.client
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from cutout.jobs.allowlist import SourcePolicy
from cutout.jobs.errors import (
    ConfigError,
    InputTooLargeError,
    NotARegularFileError,
    NotFoundError,
    SourceNotAllowedError,
    StorageError,
    TransientStorageError,
)
from cutout.jobs.settings import settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_CHUNK = 1024 * 1024


# --- public API ---------------------------------------------------------------------------------
def read_bytes(uri: str, *, max_bytes: int | None = None, policy: SourcePolicy | None = None) -> bytes:
    """The whole object; ``InputTooLargeError`` when it is bigger than ``max_bytes``.

    ``policy`` (a worker reading an input): ``SourceNotAllowedError`` before any read when the
    URI is outside the allowlist, and for an HTTP request or redirect to a private address.
    """
    kind = _kind(uri)
    if policy is not None:
        policy.check(uri)
    if kind == "local":
        return _local_read(_local_path(uri), max_bytes)
    if kind == "s3":
        bucket, key = _split_s3(uri)
        return _with_retries(f"read {uri}", lambda: _s3_read(bucket, key, uri, max_bytes))
    return _with_retries(f"read {uri}", lambda: _http_read(uri, max_bytes, policy))


def read_json_object(uri: str, what: str) -> dict:
    """A small JSON object a user pointed at (an annotation or inventory file): a missing file or
    text that is not a JSON object is a ``ConfigError`` naming ``what`` it should have been."""
    try:
        data = json.loads(read_bytes(uri))
    except NotFoundError as exc:
        raise ConfigError(f"{what} {uri!r} does not exist") from exc
    except ValueError as exc:
        raise ConfigError(f"{what} {uri}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {uri}: expected a JSON object")
    return data


@contextlib.contextmanager
def open_stream(uri: str) -> Iterator["StreamReader"]:
    """The object as a file-like read front to back (``read(n)``), never held whole: for a
    document too big to load (a COCO file of 10^8 objects). Opening retries as ``read_bytes``
    does; a failure mid-stream is a typed error (transient for a reset), not resumed."""
    kind = _kind(uri)
    if kind == "local":
        body, errors = _local_open(_local_path(uri)), _local_read_error
    elif kind == "s3":
        bucket, key = _split_s3(uri)
        response = _with_retries(f"read {uri}", lambda: _s3_call(uri, "get_object", Bucket=bucket, Key=key))
        body, errors = response["Body"], _s3_read_error
    else:
        body, errors = _with_retries(f"read {uri}", lambda: _http_open(uri)), _http_read_error
    try:
        yield StreamReader(body, uri, errors)
    finally:
        body.close()


class StreamReader:
    """``read(n)`` over a local file, boto3's StreamingBody or an HTTP response, with the
    transport's exceptions turned into this module's typed errors."""

    def __init__(self, body, uri: str, errors: Callable[[str, Exception], StorageError]):
        self.body, self.uri, self.errors = body, uri, errors

    def read(self, size: int = -1) -> bytes:
        try:
            return self.body.read(size) if size is not None and size >= 0 else self.body.read()
        except Exception as exc:  # noqa: BLE001 — mapped to a typed error, never swallowed
            error = self.errors(self.uri, exc)
            if error is None:
                raise
            raise error from exc


def write_bytes(uri: str, data: bytes, *, content_type: str | None = None,
                temp_dir: str | None = None) -> None:
    """Atomically replace the object at ``uri``; readers never see a partial write.
    ``temp_dir`` (local files): where the temp file is written before its rename, so a writer
    killed mid-write leaves it there, not beside the outputs (``sweep_temp_folder``)."""
    kind = _kind(uri)
    if kind == "local":
        _local_write(_local_path(uri), data, temp_dir)
    elif kind == "s3":
        bucket, key = _split_s3(uri)
        _with_retries(f"write {uri}", lambda: _s3_write(bucket, key, data, content_type))
    else:
        raise StorageError(f"cannot write to {uri}: http(s) sources are read-only")


def upload_file(local_path: str, uri: str, *, content_type: str | None = None) -> None:
    """Like ``write_bytes`` but from a local file, so big outputs (manifests) stay off the heap."""
    kind = _kind(uri)
    if kind == "local":
        _local_copy(local_path, _local_path(uri))
    elif kind == "s3":
        bucket, key = _split_s3(uri)
        _with_retries(f"write {uri}", lambda: _s3_upload_file(local_path, bucket, key, content_type))
    else:
        raise StorageError(f"cannot write to {uri}: http(s) sources are read-only")


def exists(uri: str) -> bool:
    kind = _kind(uri)
    if kind == "local":
        return os.path.exists(_local_path(uri))
    if kind == "s3":
        bucket, key = _split_s3(uri)
        return _with_retries(f"check {uri}", lambda: _s3_exists(bucket, key, uri))
    return _with_retries(f"check {uri}", lambda: _http_exists(uri))


def list_uris(prefix_uri: str, *, skips: "ListingSkips | None" = None) -> Iterator[str]:
    """Every object under a prefix (recursive), streamed in lexicographic order of the key.

    Local: ``prefix_uri`` is a folder; a missing folder yields nothing (as an empty S3
    prefix does). URIs come back in the form of the prefix (plain path or ``file://``).
    Only regular files are listed: pipes, sockets, devices, broken links and symlink loops
    are skipped, logged and counted in ``skips``.
    """
    kind = _kind(prefix_uri)
    if kind == "local":
        return _local_list(prefix_uri, skips if skips is not None else ListingSkips())
    if kind == "s3":
        return _s3_list(prefix_uri)
    raise StorageError(f"cannot list {prefix_uri}: http(s) has no listing")


def delete(uri: str) -> None:
    """Remove an object; deleting something that is not there is not an error (as on S3)."""
    kind = _kind(uri)
    if kind == "local":
        try:
            os.remove(_local_path(uri))
        except FileNotFoundError:
            pass  # idempotent by design, like S3 DeleteObject
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {exc}") from exc
    elif kind == "s3":
        bucket, key = _split_s3(uri)
        _with_retries(f"delete {uri}", lambda: _s3_call(uri, "delete_object", Bucket=bucket, Key=key))
    else:
        raise StorageError(f"cannot delete {uri}: http(s) sources are read-only")


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/out/", "a", "x.png") == "s3://b/out/a/x.png"``; empty parts are skipped."""
    pieces = [p.strip("/") for p in parts if p and p.strip("/")]
    if not pieces:
        return base
    return base.rstrip("/") + "/" + "/".join(pieces) if base.rstrip("/") else "/" + "/".join(pieces)


def scheme_of(uri: str) -> str:
    """``"local"``, ``"s3"`` or ``"http"``; ``StorageError`` for anything else (gs://, ftp://)."""
    return _kind(uri)


# --- retry policy -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    max_total_s: float = 60.0
    base_delay_s: float = 0.25
    max_delay_s: float = 10.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        env = settings()
        return cls(
            attempts=max(1, env.storage_retries),
            max_total_s=env.storage_retry_max_s,
            base_delay_s=env.storage_backoff_s,
        )

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (half fixed, half random) for retry number ``attempt``."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def _with_retries(what: str, call: Callable[[], T]) -> T:
    """Run ``call``; on ``TransientStorageError`` back off and retry, within attempts and time caps."""
    policy = RetryPolicy.from_env()
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except TransientStorageError as exc:
            elapsed = time.monotonic() - started
            delay = policy.delay(attempt)
            if attempt == policy.attempts or elapsed + delay > policy.max_total_s:
                raise TransientStorageError(
                    f"{what}: gave up after {attempt} attempt(s) in {elapsed:.1f}s: {exc}"
                ) from exc
            time.sleep(delay)
    raise AssertionError("unreachable")


def patiently(call: Callable[[], T], rounds: int = 4) -> T:
    """Up to ``rounds`` whole rounds of the retry policy around ``call`` (which retries inside
    itself), with a backoff between rounds: for idempotent reads where giving up fails a whole
    command (``status``, ``report``). Workers give each item 3 rounds the same way."""
    for round_number in range(1, rounds + 1):
        try:
            return call()
        except TransientStorageError:
            if round_number == rounds:
                raise
            time.sleep(RetryPolicy.from_env().delay(round_number))
    raise AssertionError("unreachable")


def _connect_timeout() -> float:
    return settings().storage_connect_timeout


def _read_timeout() -> float:
    return settings().storage_read_timeout


# --- URI parsing --------------------------------------------------------------------------------
def _kind(uri: str) -> str:
    match = _SCHEME.match(uri)
    if not match:
        return "local"
    scheme = match.group(1).lower()
    if scheme == "file":
        return "local"
    if scheme == "s3":
        return "s3"
    if scheme in ("http", "https"):
        return "http"
    raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r} (use a path, file://, s3:// or http(s)://)")


def _local_path(uri: str) -> str:
    """``file:///a/b`` and ``file://localhost/a/b`` → ``/a/b``; no percent-decoding (paths as written)."""
    if uri[:7].lower() == "file://":
        rest = uri[7:]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        if not rest.startswith("/"):
            raise StorageError(f"file URI must be absolute (file:///path): {uri!r}")
        return rest
    return uri


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"S3 URI without a bucket: {uri!r}")
    return bucket, key


# --- local files --------------------------------------------------------------------------------
def _local_read(path: str, max_bytes: int | None) -> bytes:
    try:
        with _local_open(path) as handle:
            if max_bytes is not None:
                status = os.fstat(handle.fileno())
                if status.st_size > max_bytes:
                    raise InputTooLargeError(f"{path} is {status.st_size} bytes, over the cap of {max_bytes}")
                data = handle.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise InputTooLargeError(f"{path} grew past the cap of {max_bytes} bytes")
                return data
            return handle.read()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _local_open(path: str):
    """Only regular files: a FIFO would block the reader forever and a device never ends, so the
    type is checked before opening and again on the open descriptor (opened non-blocking)."""
    try:
        _refuse_odd_file(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {path}") from exc
    except PermissionError as exc:
        raise StorageError(f"permission denied reading {path}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    handle = os.fdopen(fd, "rb")
    try:
        _refuse_odd_file(path, os.fstat(handle.fileno()).st_mode)
    except BaseException:
        handle.close()
        raise
    return handle


def _local_read_error(path: str, exc: Exception) -> StorageError | None:
    if isinstance(exc, OSError):
        return StorageError(f"cannot read {path}: {exc.strerror or exc}")
    return None


def _refuse_odd_file(path: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise StorageError(f"{path} is a folder, not a file")
    raise NotARegularFileError(f"{path} is a {_file_kind(mode)}, not a regular file: refused")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _local_write(path: str, data: bytes, temp_dir: str | None = None) -> None:
    def fill(handle) -> None:
        handle.write(data)

    _local_atomic(path, fill, temp_dir)


def _local_copy(source: str, path: str) -> None:
    def fill(handle) -> None:
        with open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                handle.write(chunk)

    _local_atomic(path, fill)


def _local_atomic(path: str, fill: Callable, temp_dir: str | None = None) -> None:
    """Write into a hidden temp file beside ``path`` (or in ``temp_dir``), fsync, then rename
    over it. A ``temp_dir`` on another file system than ``path`` falls back to beside it.

    The temp name is short and fixed in length (``.cutout-<12 hex>.tmp``), so any name the
    file system accepts can be written (a ``.<name>.<random>`` temp name overflowed 255 bytes
    for long names). The file is created with mode 0666 less the umask (0644 as usual), as
    ``open`` would; ``mkstemp`` would leave every output 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        if temp_dir:
            os.makedirs(temp_dir, exist_ok=True)
        fd, temp = _create_temp(temp_dir or folder)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        _remove_quietly(temp)
        if temp_dir and exc.errno == errno.EXDEV:
            return _local_atomic(path, fill)
        raise StorageError(f"cannot write {path}: {exc}") from exc
    except BaseException:
        _remove_quietly(temp)
        raise


TEMP_STALE_S = 3600.0  # a temp file this old has no live writer (a write takes seconds at most)


def sweep_temp_folder(folder: str, older_than: float = TEMP_STALE_S) -> int:
    """Remove the temp files that writers killed mid-write left in ``folder`` (a job's
    ``_cutout/tmp``, which holds only temps); the number removed. Files younger than
    ``older_than`` seconds may belong to a live writer and stay."""
    removed = 0
    cutoff = time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.name.startswith(".cutout-") and entry.stat().st_mtime < cutoff:
                os.remove(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _create_temp(folder: str) -> tuple[int, str]:
    """A new, exclusive temp file in ``folder`` (permissions from the umask, like ``open``)."""
    for _ in range(100):
        temp = os.path.join(folder, f".cutout-{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), temp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name in {folder}")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        return


class ListingSkips:
    """Entries a listing passed over (a named pipe, a symlink loop, a folder it cannot open),
    counted by reason and each logged as a warning: one odd entry never stops a listing."""

    EXAMPLES = 20

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []

    def add(self, path: str, reason: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(f"{path}: {reason}")
        log.warning("listing skipped %s: %s%s", path, reason, f" ({detail})" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _local_list(prefix_uri: str, skips: ListingSkips) -> Iterator[str]:
    root = _local_path(prefix_uri)
    if not os.path.isdir(root):
        return
    shown_root = prefix_uri.rstrip("/")
    yield from _walk_sorted(root, shown_root, skips, frozenset())


def _walk_sorted(folder: str, shown: str, skips: ListingSkips, ancestors: frozenset) -> Iterator[str]:
    """Depth-first walk whose order equals sorting the full paths as strings (like S3 keys).

    Sorting each folder's entries by ``name + "/"`` for folders makes ``a.txt`` come before
    ``a/x`` and ``a-b/x`` before ``a/x``, exactly as a flat string sort would. Folders reached
    through symlinks are followed, except one already on the current path (a loop); only the
    root failing to open is an error, anything below it is skipped and counted.
    """
    try:
        with os.scandir(folder) as it:
            found = list(it)
        here = os.stat(folder)
    except OSError as exc:
        if not ancestors:
            raise StorageError(f"cannot list {folder}: {exc}") from exc
        skips.add(folder, "cannot list folder", exc.strerror or str(exc))
        return
    ancestors = ancestors | {(here.st_dev, here.st_ino)}
    entries = []
    for entry in found:
        kind = _entry_kind(entry, ancestors, skips)
        if kind is not None:
            entries.append((entry.name + "/" if kind == "dir" else entry.name, entry.name, kind))
    for _, name, kind in sorted(entries):
        if kind == "dir":
            yield from _walk_sorted(os.path.join(folder, name), f"{shown}/{name}", skips, ancestors)
        else:
            yield f"{shown}/{name}"


def _entry_kind(entry: os.DirEntry, ancestors: frozenset, skips: ListingSkips) -> str | None:
    """``"dir"``, ``"file"`` (regular), or None for an entry skipped (and counted)."""
    try:
        status = entry.stat()  # follows symlinks, as the walk does
    except OSError as exc:
        broken = isinstance(exc, FileNotFoundError) and entry.is_symlink()
        loop = exc.errno == errno.ELOOP
        reason = "broken symlink" if broken else "symlink loop" if loop else "cannot stat"
        skips.add(entry.path, reason, "" if broken or loop else (exc.strerror or str(exc)))
        return None
    if stat.S_ISDIR(status.st_mode):
        if (status.st_dev, status.st_ino) in ancestors:
            skips.add(entry.path, "symlink loop", "links back to a folder above it")
            return None
        return "dir"
    if stat.S_ISREG(status.st_mode):
        return "file"
    skips.add(entry.path, "not a regular file", _file_kind(status.st_mode))
    return None


# --- S3 -----------------------------------------------------------------------------------------
_TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestLimitExceeded", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "InternalError", "ServiceUnavailable",
    "BandwidthLimitExceeded", "EC2ThrottledException", "PriorRequestNotComplete",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"}

_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple, object] = {}


def s3_client():
    """One boto3 client per process (and endpoint): made lazily, made again after a fork.

    Endpoint and credentials come from boto3's standard chain, including ``AWS_ENDPOINT_URL``
    (boto3 >= 1.28 reads it natively). botocore's own retries are off: ``_with_retries`` owns
    the policy, so attempts and total time are capped in one place.
    """
    key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"),
    )
    client = _CLIENTS.get(key)
    if client is not None:
        return client
    with _CLIENT_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=_connect_timeout(),
                read_timeout=_read_timeout(),
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=32,
            )
            stale = [k for k in _CLIENTS if k[0] != os.getpid()]
            for k in stale:  # clients inherited through fork must not be reused
                del _CLIENTS[k]
            client = boto3.session.Session().client("s3", config=config)
            _CLIENTS[key] = client
    return client


def _s3_error(uri: str, exc: Exception) -> StorageError:
    """Map a botocore exception to our typed errors."""
    from botocore import exceptions as bexc

    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = f"{uri}: {code or status} {error.get('Message', '')}".strip()
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFoundError(f"not found: {message}")
        if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
            return TransientStorageError(message)
        return StorageError(message)
    transient = (
        bexc.EndpointConnectionError, bexc.ConnectionClosedError, bexc.ReadTimeoutError,
        bexc.ConnectTimeoutError, bexc.ConnectionError, bexc.IncompleteReadError,
        bexc.ResponseStreamingError, bexc.HTTPClientError,
    )
    if isinstance(exc, transient):
        return TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}")
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}")


def _s3_call(uri: str, method: str, **kwargs):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(s3_client(), method)(**kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, exc) from exc


def _s3_read(bucket: str, key: str, uri: str, max_bytes: int | None) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    response = _s3_call(uri, "get_object", Bucket=bucket, Key=key)
    body = response["Body"]
    try:
        size = response.get("ContentLength")
        if max_bytes is not None and size is not None and size > max_bytes:
            raise InputTooLargeError(f"{uri} is {size} bytes, over the cap of {max_bytes}")
        data = body.read() if max_bytes is None else body.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise InputTooLargeError(f"{uri} is over the cap of {max_bytes} bytes")
        return data
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, exc) from exc
    except (OSError, http.client.HTTPException) as exc:  # reset mid-body
        raise TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        body.close()


def _s3_read_error(uri: str, exc: Exception) -> StorageError | None:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, (ClientError, BotoCoreError)):
        return _s3_error(uri, exc)
    if isinstance(exc, (OSError, http.client.HTTPException)):  # reset mid-body
        return TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}")
    return None


def multipart_threshold() -> int:
    return settings().s3_multipart_threshold


def _s3_write(bucket: str, key: str, data: bytes, content_type: str | None) -> None:
    uri = f"s3://{bucket}/{key}"
    extra = {"ContentType": content_type} if content_type else {}
    if len(data) < multipart_threshold():
        _s3_call(uri, "put_object", Bucket=bucket, Key=key, Body=data, **extra)
        return
    _s3_multipart(uri, io.BytesIO(data), bucket, key, extra)


def _s3_upload_file(local_path: str, bucket: str, key: str, content_type: str | None) -> None:
    uri = f"s3://{bucket}/{key}"
    extra = {"ContentType": content_type} if content_type else {}
    try:
        with open(local_path, "rb") as handle:
            _s3_multipart(uri, handle, bucket, key, extra)
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {local_path}") from exc


def _s3_multipart(uri: str, fileobj, bucket: str, key: str, extra: dict) -> None:
    """boto3's managed transfer: multipart above the threshold (parts >= 5 MiB), one PUT below."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import S3UploadFailedError

    threshold = multipart_threshold()
    config = TransferConfig(
        multipart_threshold=threshold,
        multipart_chunksize=max(threshold, 5 * 1024 * 1024),
        max_concurrency=4,
    )
    try:
        s3_client().upload_fileobj(fileobj, bucket, key, ExtraArgs=extra or None, Config=config)
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, exc) from exc
    except S3UploadFailedError as exc:  # wraps the ClientError of a failed part as text
        text = str(exc)
        if any(code in text for code in _TRANSIENT_CODES) or re.search(r"\b5\d\d\b", text):
            raise TransientStorageError(f"{uri}: {text}") from exc
        raise StorageError(f"{uri}: {text}") from exc


def _s3_exists(bucket: str, key: str, uri: str) -> bool:
    try:
        _s3_call(uri, "head_object", Bucket=bucket, Key=key)
    except NotFoundError:
        return False
    return True


def _s3_list(prefix_uri: str) -> Iterator[str]:
    """One page (<= 1000 keys) in memory at a time; each page call has its own retries."""
    bucket, prefix = _split_s3(prefix_uri)
    token = None
    while True:
        kwargs = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = _with_retries(f"list {prefix_uri}", lambda: _s3_call(prefix_uri, "list_objects_v2", **kwargs))
        for entry in page.get("Contents", ()):
            if not entry["Key"].endswith("/"):  # folder markers made by consoles
                yield f"s3://{bucket}/{entry['Key']}"
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


LIST_THREADS = 16  # concurrent ListObjectsV2 calls of one tree listing
_LIST_LOOKAHEAD = 32  # sub-prefixes listed ahead of the one being read


def list_tree(prefix_uri: str) -> Iterator[str]:
    """Every object under a prefix, in the same order as ``list_uris``; S3 prefixes are listed
    in parallel.

    One ListObjectsV2 chain returns 1,000 keys per call, one call after another (100,000 calls
    for 10^8 objects). Here each level is listed with ``Delimiter='/'`` and its sub-prefixes
    ("folders") are listed concurrently on a bounded thread pool, a few dozen ahead of the one
    being read; keys and sub-prefixes are merged in key order, so the output is exactly the
    flat listing's. A bucket with no folders gains nothing (it is one chain either way).
    """
    if _kind(prefix_uri) != "s3":
        yield from list_uris(prefix_uri)
        return
    from concurrent.futures import ThreadPoolExecutor

    bucket, prefix = _split_s3(prefix_uri)
    with ThreadPoolExecutor(LIST_THREADS, thread_name_prefix="cutout-list") as pool:
        first = pool.submit(_s3_level_page, bucket, prefix, None)
        yield from _s3_level(pool, bucket, prefix, first)


def _s3_level_page(bucket: str, prefix: str, token: str | None) -> dict:
    """One page of one level: keys directly under ``prefix`` and its sub-prefixes."""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    if token:
        kwargs["ContinuationToken"] = token
    uri = f"s3://{bucket}/{prefix}"
    return _with_retries(f"list {uri}", lambda: _s3_call(uri, "list_objects_v2", **kwargs))


def _s3_level(pool, bucket: str, prefix: str, page_future) -> Iterator[str]:
    while page_future is not None:
        page = page_future.result()
        token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        page_future = pool.submit(_s3_level_page, bucket, prefix, token) if token else None
        subs = [entry["Prefix"] for entry in page.get("CommonPrefixes", ())]
        entries = sorted([(entry["Key"], False) for entry in page.get("Contents", ())]
                         + [(sub, True) for sub in subs])
        ahead: dict[str, object] = {}
        upcoming = iter(subs)

        def list_ahead() -> None:
            while len(ahead) < _LIST_LOOKAHEAD:
                sub = next(upcoming, None)
                if sub is None:
                    return
                ahead[sub] = pool.submit(_s3_level_page, bucket, sub, None)

        for name, is_prefix in entries:
            if not is_prefix:
                if not name.endswith("/"):  # folder markers made by consoles
                    yield f"s3://{bucket}/{name}"
                continue
            list_ahead()
            yield from _s3_level(pool, bucket, name, ahead.pop(name))


# --- HTTP(S), read-only -------------------------------------------------------------------------
_USER_AGENT = "cutout-dataset"


def _http_deadline_s() -> float:
    """Total seconds one HTTP request may take, headers and body together."""
    return settings().storage_http_deadline or _read_timeout() * 4


class _DeadlineReader(io.RawIOBase):
    """The response's socket reader, with every read's timeout shrunk to what is left of the
    request's total deadline: a server that trickles a byte at a time (headers or body) cannot
    hold a worker past it, while a steady fast download is never cut by the per-read timeout."""

    def __init__(self, raw, sock: socket.socket, deadline: float, total_s: float):
        super().__init__()
        self.raw, self.sock, self.deadline, self.total_s = raw, sock, deadline, total_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"total deadline of {self.total_s:g}s passed")
        self.sock.settimeout(min(_read_timeout(), left))
        try:
            return self.raw.readinto(buffer)
        except TimeoutError as exc:
            if time.monotonic() >= self.deadline:
                raise TimeoutError(f"total deadline of {self.total_s:g}s passed") from exc
            raise

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: float, total_s: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        raw = self.fp.detach()  # keep the socket's reader (it holds the socket open), wrap it
        self.fp = io.BufferedReader(_DeadlineReader(raw, sock, deadline, total_s))


class _Guarded:
    """Mixed into http.client's connections: the connect and every read fit in the deadline."""

    def __init__(self, *args, deadline: float, total_s: float, peer_check=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self.peer_check = peer_check
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline, total_s=total_s)
        self._create_connection = self._connect_in_time

    def _connect_in_time(self, address, timeout, source_address=None):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("total deadline passed before connecting")
        sock = socket.create_connection(address, min(timeout, left), source_address)
        if self.peer_check is not None:  # the address really reached, before a byte is sent
            try:
                self.peer_check(sock.getpeername()[0])
            except BaseException:
                sock.close()
                raise
        return sock


class _GuardedHTTPConnection(_Guarded, http.client.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, http.client.HTTPSConnection):
    pass


class _Guard:
    """What every connection of one read shares: the deadline and the source policy."""

    def __init__(self, deadline: float, total_s: float, policy: SourcePolicy | None):
        self.deadline, self.total_s, self.policy = deadline, total_s, policy

    def connection(self, cls, req):
        """``cls`` bound to the deadline, checking the peer's address unless it is a proxy
        (then the target's resolved addresses are checked instead)."""
        peer_check = None
        if self.policy is not None:
            url, policy = req.full_url, self.policy
            if req.has_proxy() or getattr(req, "_tunnel_host", None):
                policy.check_resolved(url)
            else:
                peer_check = functools.partial(policy.check_address, url)
        return functools.partial(cls, deadline=self.deadline, total_s=self.total_s, peer_check=peer_check)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def http_open(self, req):
        return self.do_open(self.guard.connection(_GuardedHTTPConnection, req), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def https_open(self, req):
        return self.do_open(self.guard.connection(_GuardedHTTPSConnection, req), req, context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """A redirect must itself be an allowed source (its address is checked on connect)."""

    def __init__(self, guard: _Guard):
        super().__init__()
        self.guard = guard

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if self.guard.policy is not None:
            target = urllib.parse.urljoin(req.full_url, newurl)
            try:
                self.guard.policy.check(target)
            except SourceNotAllowedError as exc:
                fp.close()
                raise SourceNotAllowedError(f"{req.full_url} redirects to {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_opener(policy: SourcePolicy | None = None) -> urllib.request.OpenerDirector:
    """An opener whose every connection (redirects included) shares one total deadline."""
    total_s = _http_deadline_s()
    guard = _Guard(time.monotonic() + total_s, total_s, policy)
    return urllib.request.build_opener(_GuardedHTTPHandler(guard), _GuardedHTTPSHandler(guard),
                                       _GuardedRedirectHandler(guard))


def _http_open(uri: str, method: str = "GET", policy: SourcePolicy | None = None):
    request = urllib.request.Request(uri, method=method, headers={"User-Agent": _USER_AGENT})
    try:
        # urllib's timeout is the connect one here; each read then gets the read timeout,
        # shrunk to what is left of the total deadline (see _DeadlineReader)
        return _http_opener(policy).open(request, timeout=_connect_timeout())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (404, 410):
            raise NotFoundError(f"not found: {uri} (HTTP {exc.code})") from exc
        if (exc.code >= 500 and exc.code != 501) or exc.code in (408, 429):
            raise TransientStorageError(f"{uri}: HTTP {exc.code}") from exc
        raise StorageError(f"{uri}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}") from exc


def _http_read(uri: str, max_bytes: int | None, policy: SourcePolicy | None = None) -> bytes:
    response = _http_open(uri, policy=policy)
    with response:
        length = response.headers.get("Content-Length")
        if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
            raise InputTooLargeError(f"{uri} is {length} bytes, over the cap of {max_bytes}")
        chunks, total = [], 0
        try:
            while chunk := response.read(_CHUNK):
                chunks.append(chunk)
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise InputTooLargeError(f"{uri} is over the cap of {max_bytes} bytes")
        except (OSError, http.client.HTTPException) as exc:
            raise TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}") from exc
    return b"".join(chunks)


def _http_read_error(uri: str, exc: Exception) -> StorageError | None:
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return TransientStorageError(f"{uri}: {type(exc).__name__}: {exc}")
    return None


def _http_exists(uri: str) -> bool:
    """HEAD, or a GET whose body is not read when the server does not implement HEAD."""
    try:
        try:
            with _http_open(uri, method="HEAD"):
                return True
        except StorageError as exc:
            if isinstance(exc, (NotFoundError, TransientStorageError)) or not re.search(r"HTTP (405|501)\b", str(exc)):
                raise
        with _http_open(uri):
            return True
    except NotFoundError:
        return False
