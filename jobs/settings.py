"""Every ``CUTOUT_*`` environment variable, read in one typed place.

Why one place: a setting read with ``os.environ.get`` in a far-away module is a setting nobody
documents (16 of 31 were undocumented). Here each variable is a field with a type, a default and
a one-line description; the README's environment table is generated from this class
(``python -m cutout.jobs.settings --markdown``) and a test keeps the two equal.

``settings()`` reflects the environment *now*: tests change variables with monkeypatch, and
``cutout worker`` sets variables for its pool processes. It is cached per snapshot of the
``CUTOUT_*`` variables, so a hot path pays for a dict scan, not a validation.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import types
import typing
from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cutout.jobs.errors import ConfigError

ENV_PREFIX = "CUTOUT_"
MiB = 1024 * 1024
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


def _field(default, what: str, shown: str | None = None):
    """A setting: its default, what it does, and how the README shows a computed default."""
    return Field(default, description=what, json_schema_extra={"shown_default": shown} if shown else None)


class Settings(BaseSettings):
    """The process environment as typed settings; an empty variable counts as unset."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore",
                                      frozen=True)

    # --- queue and live progress (submitter and workers) ---
    broker_url: str = _field("redis://127.0.0.1:6379/0", "Celery broker (Redis); `--broker` overrides")
    redis_url: str | None = _field(None, "live-progress Redis; `--redis` overrides", "the broker URL")
    visibility_timeout: int = _field(3 * 3600, "seconds before an unacked shard goes to another worker (longer than the slowest shard)", "`10800` (3 h)")
    unacked_restore_interval: int | None = _field(None, "seconds between sweeps for abandoned messages (kombu)", "kombu's")
    unacked_restore_throttle: int | None = _field(None, "sweep throttle multiplier (kombu)", "kombu's")
    progress_ttl_s: int = _field(3 * 24 * 3600, "seconds the live-progress keys of a job live in Redis", "`259200` (3 days)")
    worker_alive_s: float = _field(60.0, "a worker whose last heartbeat is older is not counted alive")
    task_max_retries: int = _field(10, "retries of a shard task after transient errors")
    queue_window: int = _field(10_000, "most shard messages of one job waiting in the broker at once (the rest are sent as the queue drains)")
    debug: bool = _field(False, "print the full traceback of an error instead of one line (`--debug`)")

    # --- storage ---
    storage_retries: int = _field(6, "attempts per storage call on transient errors")
    storage_retry_max_s: float = _field(60.0, "total seconds spent retrying one storage call")
    storage_backoff_s: float = _field(0.25, "first backoff delay in seconds (doubles, jittered, max 10 s)")
    storage_connect_timeout: float = _field(5.0, "storage connect timeout, seconds")
    storage_read_timeout: float = _field(60.0, "storage read timeout, seconds")
    storage_http_deadline: float | None = _field(None, "total seconds for one HTTP(S) read, headers and body together (enforced at the socket)", "4 × the read timeout")
    allowed_sources: str | None = _field(None, "comma-separated URI prefixes a worker may read inputs from (checked before any read)", "`s3://,http://,https://`")
    allow_private_hosts: bool = _field(False, "let workers read http(s) inputs and follow redirects to loopback, private or link-local addresses")
    s3_multipart_threshold: int = _field(64 * MiB, "bytes above which an S3 upload is multipart", "64 MiB")
    max_input_bytes: int = _field(200 * MiB, "inputs larger than this are recorded failed (`InputTooLargeError`)", "200 MiB")

    # --- worker ---
    queues: str = _field("cutout", "comma-separated queues `cutout worker` consumes (`-Q`)")
    concurrency: int | None = _field(None, "pool processes of a `cutout worker` (docker-compose passes it as `--concurrency`)", "one per GPU, else cores/2")
    processes_per_gpu: int = _field(1, "`cutout worker` pool processes sharing each GPU (CPU post-processing in parallel)")
    worker_gpus: str = _field("", "GPU ids the pool processes pin themselves to, round robin (set by `cutout worker`)", "all visible")
    device: str | None = _field(None, "device of a worker's pipeline: `cpu`, `cuda`, `cuda:1`", "cuda when present")
    max_tasks_per_child: int | None = _field(None, "recycle a pool process after this many shards", "never")
    batch_size: int = _field(8, "images per pipeline batch in a shard")
    io_threads: int = _field(8, "storage threads per shard that read the next batch and write the last one while the model runs")
    max_item_crashes: int = _field(2, "worker deaths with one input alone on the model before that input is recorded failed")
    item_attempts: int = _field(3, "tries of one input's read or write on transient storage errors (each with the storage retries) before it is recorded `TransientStorageError`")
    item_retry_max_s: float = _field(120.0, "total seconds those tries of one input may take")
    item_backoff_s: float = _field(1.0, "first wait between those tries, seconds (doubles)")
    worker_stale_s: float = _field(60.0, "a worker holding a shard with no heartbeat for this long is taken for dead and its shard re-sent")
    unexpected_retries: int = _field(3, "tries of a shard that fails on an unexpected exception before its inputs are recorded `WorkerError`")
    unexpected_backoff_s: float = _field(10.0, "first wait before such a retry, seconds (doubles)")
    task_events: bool = _field(False, "workers send Celery task events (for Flower)")
    reap_interval: float = _field(15.0, "seconds between a worker's sweeps for shards held by dead workers")
    metrics_port: int = _field(9108, "port of a worker's Prometheus `/metrics` (0 = off; `--metrics-port`)")
    metrics_addr: str = _field("0.0.0.0", "address the metrics server listens on")
    heartbeat_interval: float = _field(5.0, "seconds between a busy worker's heartbeats")
    manifest_group_shards: int | None = _field(None, "shards per manifest part (a group); fixed for a job when it is submitted", "up to 1000 shards and 10^6 rows")
    manifest_inline_shards: int = _field(64, "a worker writes a finished group's part itself when the group has at most this many shards; bigger groups get their own small task")

    # --- models and pipeline ---
    models_dir: str | None = _field(None, "where weights are stored and looked up", "`~/.cache/cutout/models`")
    runtime: Literal["auto", "torch", "onnxruntime"] = _field("auto", "segmentation runtime: `auto` is `torch` on CUDA, `onnxruntime` on CPU (measured faster)")
    threads: int | None = _field(None, "CPU threads for segmentation", "the cores")
    seg_batch: int | None = _field(None, "images per segmentation forward pass", "8 on CUDA, 1 on CPU")
    matting_budget: int = _field(12000, "unknown pixels solved at most (larger bands solve downscaled)")
    eval_data: str = _field("../shared/testdata", "test data folder of `cutout eval`")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value):
        if value is not None and not DEVICE_PATTERN.match(value):
            raise ValueError("expected cpu, cuda or cuda:N")
        return value

    @field_validator("runtime", mode="before")
    @classmethod
    def _normalise_runtime(cls, value):
        return value.strip().lower() if isinstance(value, str) else value


@lru_cache(maxsize=8)
def _settings_for(snapshot: tuple[tuple[str, str], ...]) -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def settings() -> Settings:
    """The current settings (cached per snapshot of the ``CUTOUT_*`` environment)."""
    snapshot = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    return _settings_for(snapshot)


def reload_settings() -> Settings:
    """Forget every cached snapshot (for tests that change the environment behind our back)."""
    _settings_for.cache_clear()
    return settings()


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        name = ENV_PREFIX + str(error["loc"][0]).upper() if error["loc"] else "settings"
        parts.append(f"{name}={error.get('input')!r}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


# --- documentation ------------------------------------------------------------------------------
def env_names() -> list[str]:
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields]


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(str(a) for a in args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _type_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


def _shown_default(field) -> str:
    extra = field.json_schema_extra or {}
    if extra.get("shown_default"):
        return extra["shown_default"]
    return f"`{field.default}`"


def markdown_table() -> str:
    """The README's environment table, one row per field."""
    rows = ["| variable | type | default | what |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {_type_name(field.annotation)} | "
                    f"{_shown_default(field)} | {field.description} |")
    return "\n".join(rows)


def redact_url(text: str) -> str:
    """Credentials out of ``text`` (one rule for the whole project: cutout.jobs.redact)."""
    from cutout.jobs.redact import redact

    return redact(text)


TABLE_START, TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def readme_region(text: str) -> str:
    """The table between the README's markers (what a test compares with ``markdown_table``)."""
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[start:end].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cutout.jobs.settings",
                                     description="Show cutout's environment settings.")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    parser.add_argument("--write-readme", metavar="README", help="replace the table in this file")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    if args.write_readme:
        with open(args.write_readme, encoding="utf-8") as handle:
            text = handle.read()
        start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
        text = f"{text[:start]}\n{markdown_table()}\n{text[end:]}"
        with open(args.write_readme, "w", encoding="utf-8") as handle:
            handle.write(text)
        return 0
    for name, value in settings().model_dump().items():
        print(f"{ENV_PREFIX}{name.upper()}={redact_url(str(value)) if value is not None else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
