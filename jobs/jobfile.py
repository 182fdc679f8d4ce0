"""A job file: the job spec's fields in TOML, for ``cutout submit --config`` and ``cutout run --config``.

Why: a job worth running overnight is worth keeping in a file next to the data, and the same
file should drive a local trial (``run``) and the fleet (``submit``). The keys are the field
names of ``JobSpec`` and every ``PipelineOptions`` field, user-facing or internal (top level, or
pipeline fields in a ``[pipeline]`` table); the file's values become the command's defaults, so
flags on the command line win. Each value is checked against its field's type here (text such
as ``"isnet-general=1024"`` parses as on the command line), so an error names the file and the key.
"""
from __future__ import annotations

import argparse
import sys
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cutout.jobs.errors import ConfigError
from cutout.jobs.spec import Background, JobSpec, PipelineOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Keys only one command uses: the other command ignores them (with a note), so one file serves both.
SUBMIT_ONLY: dict[str, FieldInfo] = {
    "shard_size": JobSpec.model_fields["shard_size"],
    "queue": JobSpec.model_fields["queue"],
    "suffix": JobSpec.model_fields["suffix"],
    "all_files": FieldInfo.from_annotated_attribute(bool, False),
}
RUN_ONLY: dict[str, FieldInfo] = {
    "device": FieldInfo.from_annotated_attribute(str, None),
    "batch_size": FieldInfo.from_annotated_attribute(int, Field(4, ge=1)),
    "trimaps": FieldInfo.from_annotated_attribute(str, None),
}
COMMON: dict[str, FieldInfo] = {
    "sources": JobSpec.model_fields["sources"],
    "destination": JobSpec.model_fields["destination"],
    **PipelineOptions.model_fields,
}
KNOWN = {**COMMON, **SUBMIT_ONLY, **RUN_ONLY}
# Where ``cutout run`` keeps the job spec's sources and destination.
RUN_DESTS = {"sources": "inputs", "destination": "out"}


def read_job_file(path: str) -> dict[str, Any]:
    """The file's keys, flattened (``[pipeline]`` merged in) and each value checked."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"job file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"job file {path}: not valid TOML: {exc}") from None
    pipeline = data.pop("pipeline", {})
    if not isinstance(pipeline, dict):
        raise ConfigError(f"job file {path}: 'pipeline' must be a table ([pipeline])")
    values: dict[str, Any] = {}
    for key, value in [*data.items(), *pipeline.items()]:
        name = key.replace("-", "_")
        if name not in KNOWN or (key in pipeline and name not in PipelineOptions.model_fields):
            raise ConfigError(f"job file {path}: unknown key {key!r} "
                              f"(known: {', '.join(sorted(KNOWN))})")
        if name in values:
            raise ConfigError(f"job file {path}: key {key!r} is given twice")
        values[name] = _checked(path, name, value)
    return values


def _checked(path: str, name: str, value: Any) -> Any:
    if name == "sources" and isinstance(value, str):
        value = [value]
    field = KNOWN[name]
    try:
        checked = TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
        if name == "background":
            Background.parse(checked)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(f"job file {path}: {name} = {value!r}: {message}") from None
    except ConfigError as exc:
        raise ConfigError(f"job file {path}: {name} = {value!r}: {exc}") from None
    return list(checked) if isinstance(checked, tuple) else checked


def apply_job_file(parser: argparse.ArgumentParser, command: str, path: str) -> None:
    """Make the file's values ``parser``'s defaults; keys without a flag go to ``pipeline_extra``."""
    values = read_job_file(path)
    other = SUBMIT_ONLY if command == "run" else RUN_ONLY
    ignored = sorted(k for k in values if k in other)
    if ignored:
        print(f"cutout: note: job file {path}: {', '.join(ignored)} not used by `cutout {command}`",
              file=sys.stderr)
    flags = {action.dest for action in parser._actions}
    defaults: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in values.items():
        if name in ignored:
            continue
        dest = RUN_DESTS.get(name, name) if command == "run" else name
        if dest in flags:
            defaults[dest] = value
        else:
            extra[name] = value
    parser.set_defaults(**defaults, pipeline_extra=extra)


def require_sources_and_destination(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What ``nargs='+'`` and ``required=True`` said before a job file could supply them."""
    sources, destination = ("inputs", "out") if args.command == "run" else ("sources", "destination")
    flag = "--out" if args.command == "run" else "--to"
    if not getattr(args, sources):
        parser.error("give at least one SOURCE (or `sources` in a --config job file)")
    if not getattr(args, destination):
        parser.error(f"{flag} is required (or `destination` in a --config job file)")
