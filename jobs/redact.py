"""Secrets out of every message and log line: one ``redact()`` for text, one log-record hook.

What is masked: the password (or token) in a URL's userinfo (``redis://:pw@h``,
``https://user:pw@h``, ``https://token@h``), secret-looking query parameters (presigned S3 and
GCS signatures and credentials, ``token``, ``key``, ``password``...), AWS access key ids, and
the literal values of secret environment variables (AWS secret key and session token, the
passwords in CUTOUT_BROKER_URL / CUTOUT_REDIS_URL). Typed errors redact their own message
(cutout.jobs.errors), so records, the CLI and logs all get the masked text.
"""
from __future__ import annotations

import logging
import os
import re
import traceback
import urllib.parse

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#'\"]+)@")
_SECRET_PARAMS = (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
    "x-goog-credential", "awsaccesskeyid", "signature", "sig", "token", "access_token", "auth",
    "api_key", "apikey", "key", "password", "passwd", "pwd", "secret", "client_secret", "code",
)
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(re.escape(p) for p in _SECRET_PARAMS) + r")=)[^&;#\s'\"]+",
    re.IGNORECASE,
)
_ACCESS_KEY = re.compile(r"\b(?P<kind>AKIA|ASIA)[0-9A-Z]{16}\b")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_URL_ENV = ("CUTOUT_BROKER_URL", "CUTOUT_REDIS_URL")
_MIN_SECRET_LEN = 12  # shorter env values (a test's "testing") would mask ordinary words


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***`` (see the module docstring)."""
    if not text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _QUERY_SECRET.sub(lambda m: m.group("name") + MASK, text)
    text = _ACCESS_KEY.sub(lambda m: m.group("kind") + "*" * 16, text)
    for secret in _secret_values():
        text = text.replace(secret, MASK)
    return text


def _mask_userinfo(match: re.Match) -> str:
    user, colon, _ = match.group("userinfo").partition(":")
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match.group('scheme')}{shown}@"


def _secret_values() -> list[str]:
    values = [os.environ.get(name, "") for name in _SECRET_ENV]
    for name in _URL_ENV:
        try:
            values.append(urllib.parse.urlsplit(os.environ.get(name, "")).password or "")
        except ValueError:
            continue
    return [v for v in values if len(v) >= _MIN_SECRET_LEN]


def install_log_redaction() -> None:
    """Redact every log record of this process (and of children forked later), whichever
    logger or handler it goes through: the message is formatted and masked when the record
    is made, and so is the text of an attached exception. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacting", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        return _redacted(previous(*args, **kwargs))

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def _redacted(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string is the caller's bug; leave it
        return record
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record
