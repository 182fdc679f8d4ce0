"""Checks a command makes before it writes anything: reachable Redis, a readable background
image. (The device check needs torch, so it is the worker side's: ``cutout.workers.models.base``.)

Why: without them a stopped Redis showed up as a 51-line traceback after the spec was already
written, and a bad ``image:`` background failed every input of a job one by one. Each check
raises a typed error with a one-line message and a hint; ``cutout.jobs.cli`` prints it and
exits with the code documented in the README.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
from urllib.parse import urlsplit

from cutout.jobs.errors import ConfigError, CutoutError, ServiceUnavailableError
from cutout.jobs.settings import redact_url

REDIS_SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT_S = 3.0
BACKGROUND_MAX_BYTES = 256 * 1024 * 1024


def check_redis_url(url: str, what: str, hint: str) -> None:
    """``url`` is a well-formed Redis URL (no connection made): a typo such as ``redis:/host``
    is a usage error for every command, not an unexpected ValueError half-way through."""
    from redis.connection import parse_url

    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{what} {redact_url(url)!r}: cutout needs Redis "
                          f"({', '.join(s + '://' for s in REDIS_SCHEMES)}); {hint}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"{what} {redact_url(url)!r} names no host (redis://HOST:PORT/DB); {hint}")
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"{what} {redact_url(url)!r}: {exc}; {hint}") from None
    database = parts.path.strip("/")
    if parts.scheme != "unix" and database and not database.isdigit():
        raise ConfigError(f"{what} {redact_url(url)!r}: the database must be a number "
                          f"(redis://HOST:PORT/0), not {database!r}; {hint}")


def check_redis(url: str, what: str, hint: str) -> None:
    """``url`` names a Redis we can PING; ``what`` and ``hint`` make the message say which one."""
    import redis

    check_redis_url(url, what, hint)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                      socket_timeout=CONNECT_TIMEOUT_S)
        client.ping()
    except ValueError as exc:
        raise ConfigError(f"{what} {redact_url(url)!r}: {exc}; {hint}") from None
    except redis.exceptions.AuthenticationError as exc:
        raise ServiceUnavailableError(f"{what} at {redact_url(url)} refused the credentials ({exc}); "
                                      f"check the password in the URL") from None
    except (redis.exceptions.RedisError, OSError) as exc:
        reason = redact_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ServiceUnavailableError(f"{what} at {redact_url(url)} is unreachable ({reason}); "
                                      f"is redis-server running? {hint}") from None


BROKER_HINT = "set CUTOUT_BROKER_URL or --broker"
PROGRESS_HINT = "set CUTOUT_REDIS_URL or --redis"


def resolve_connection(args: argparse.Namespace) -> None:
    """One Redis for the queue and the live progress unless told otherwise.

    ``--broker`` (else CUTOUT_BROKER_URL) names the broker; the progress Redis is ``--redis``,
    else CUTOUT_REDIS_URL, else that same broker, for every command alike. Without this,
    ``submit --broker H`` queued on H but wrote progress to the default local Redis, and
    ``status --broker H`` could not find the job.
    """
    if not hasattr(args, "broker"):
        return
    from cutout.jobs.settings import settings

    args.broker = args.broker or settings().broker_url
    args.redis = args.redis or settings().redis_url or args.broker


def check_connection_urls(args: argparse.Namespace) -> None:
    """Both URLs are well formed (every command that takes them)."""
    check_redis_url(args.broker, "broker", BROKER_HINT)
    if args.redis != args.broker:
        check_redis_url(args.redis, "live-progress Redis", PROGRESS_HINT)


def check_queue(broker: str, progress_redis: str) -> None:
    """The broker and the live-progress Redis (often the same one) answer."""
    check_redis(broker, "broker", BROKER_HINT)
    if progress_redis != broker:
        check_redis(progress_redis, "live-progress Redis", PROGRESS_HINT)


def check_background(options) -> None:
    """An ``image:`` background is read and decoded once here, not failed once per input."""
    background = options.parsed_background()
    if background.kind != "image":
        return
    from PIL import Image, UnidentifiedImageError

    from cutout.jobs.storage import read_bytes

    uri = background.image_uri or ""
    try:
        data = read_bytes(uri, max_bytes=BACKGROUND_MAX_BYTES)
    except CutoutError as exc:
        raise ConfigError(f"background image {redact_url(uri)!r} cannot be read: {exc}; "
                          "give image:PATH, image:file://... or image:s3://...") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(f"background image {redact_url(uri)!r} is not an image we can decode "
                          f"({type(exc).__name__})") from None


LIST_FILE_PEEK = 100  # entries of a local list file looked at for local paths


def local_sources_warning(sources: list[str], *, all_files: bool = False) -> str | None:
    """One line when workers would refuse local inputs of this submit under the allowlist this
    environment gives (CUTOUT_ALLOWED_SOURCES; by default no local file), else None.

    Why: ``submit photos/`` was accepted and every input then failed ``SourceNotAllowedError``
    on the workers. The job is still submitted: the workers may be configured otherwise.
    """
    from cutout.jobs.allowlist import SourcePolicy
    from cutout.jobs.errors import SourceNotAllowedError
    from cutout.jobs.sources import is_list_file, iter_source_items
    from cutout.jobs.storage import scheme_of

    policy = SourcePolicy.from_env()
    for source in sources:
        if scheme_of(source) != "local":
            continue
        if is_list_file(source):
            entries = itertools.islice(iter_source_items([source], all_files=all_files), LIST_FILE_PEEK)
            candidates = [(item.uri, os.path.dirname(_local_path(item.uri))) for item in entries]
        else:
            candidates = [(source, _folder_of(source))]
        for uri, folder in candidates:
            if scheme_of(uri) != "local":
                continue
            try:
                policy.check(uri)
            except SourceNotAllowedError:
                allowed = ",".join(policy.prefixes) or "(empty)"
                return (f"workers read local files only below a prefix of CUTOUT_ALLOWED_SOURCES "
                        f"(here {allowed}), so the local inputs of {source!r} would fail SourceNotAllowedError: "
                        f"start the workers with CUTOUT_ALLOWED_SOURCES={allowed},file://"
                        f"{folder.rstrip('/')}/ and that folder at the same path (submitted anyway)")
    return None


def _local_path(uri: str) -> str:
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def _folder_of(source: str) -> str:
    """The folder a folder, file or glob source lies in, as an absolute path."""
    path = _local_path(source)
    while any(c in path for c in "*?["):
        path = os.path.dirname(path)
    return path if os.path.isdir(path) else os.path.dirname(path)


def run_checks(args: argparse.Namespace) -> None:
    """The checks of one command, in the order a user would fix them."""
    command = getattr(args, "command", None)
    if command in ("run", "submit"):
        from cutout.jobs.cli_options import options_from_args

        check_background(options_from_args(args))
    resolve_connection(args)
    if hasattr(args, "broker"):
        check_connection_urls(args)
    if command in ("submit", "resume", "retry-failed", "redo"):
        check_queue(args.broker, args.redis)
    if command == "submit":
        warning = local_sources_warning(args.sources, all_files=args.all_files)
        if warning:
            print(f"cutout: warning: {warning}", file=sys.stderr)
