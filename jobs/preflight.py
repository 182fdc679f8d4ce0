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
from urllib.parse import urlsplit

from cutout.jobs.errors import ConfigError, CutoutError, ServiceUnavailableError
from cutout.jobs.settings import redact_url

REDIS_SCHEMES = ("redis", "rediss", "unix")
CONNECT_TIMEOUT_S = 3.0
BACKGROUND_MAX_BYTES = 256 * 1024 * 1024


def check_redis(url: str, what: str, hint: str) -> None:
    """``url`` names a Redis we can PING; ``what`` and ``hint`` make the message say which one."""
    import redis

    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{what} {redact_url(url)!r}: cutout needs Redis "
                          f"({', '.join(s + '://' for s in REDIS_SCHEMES)}); {hint}")
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


def check_queue(broker: str | None, progress_redis: str | None) -> None:
    """The broker and the live-progress Redis (often the same one) answer."""
    from cutout.jobs.queue import broker_url, redis_url

    broker = broker or broker_url()
    check_redis(broker, "broker", "set CUTOUT_BROKER_URL or --broker")
    progress = progress_redis or redis_url()  # as cutout.jobs.submit.redis_client picks it
    if progress != broker:
        check_redis(progress, "live-progress Redis", "set CUTOUT_REDIS_URL or --redis")


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


def run_checks(args: argparse.Namespace) -> None:
    """The checks of one command, in the order a user would fix them."""
    command = getattr(args, "command", None)
    if command in ("run", "submit"):
        from cutout.jobs.cli_options import options_from_args

        check_background(options_from_args(args))
    if command in ("submit", "resume", "retry-failed"):
        check_queue(args.broker, args.redis)
