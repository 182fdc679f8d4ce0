"""Pipeline options on the command line, shared by ``run``, ``eval``, ``submit`` and ``redo``.

The flags are made from ``cutout.jobs.spec.PipelineOptions``' user-facing fields (name, type,
choices, help), so a new option reaches every command by being declared once. Every flag
defaults to ``None`` ("not given"): the schema's own default, or the preset's, applies later,
and ``redo`` can tell an override from an untouched option. Validation errors become ConfigError.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from cutout.jobs.errors import ConfigError
from cutout.jobs.presets import PRESETS
from cutout.jobs.spec import PipelineOptions, user_option_fields

_SCALARS = (int, float, str)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag-name`` per user-facing PipelineOptions field."""
    group = parser.add_argument_group("pipeline")
    for name, info in user_option_fields().items():
        flag = "--" + name.replace("_", "-")
        if info.annotation is bool:  # a switch (--crop), or a value (--crop false), absent: not set
            group.add_argument(flag, dest=name, nargs="?", const=True, type=_switch, default=None,
                               help=_help(name, info))
            continue
        kind, choices = _flag_type(info.annotation)
        group.add_argument(flag, dest=name, type=kind, choices=choices, default=None,
                           help=_help(name, info))


def chosen_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline options given on the command line (or by a job file): name -> raw value."""
    given = {name: getattr(args, name, None) for name in user_option_fields()}
    return {name: value for name, value in given.items() if value is not None}


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    fields = {
        **chosen_options(args),
        **(getattr(args, "pipeline_extra", None) or {}),  # job-file fields without a flag
    }
    try:
        return PipelineOptions(**fields)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from exc


def validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'spec'}: {error['msg']}" for error in exc.errors()
    )


def _switch(text: str) -> bool:
    """A boolean flag's optional value: true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def _flag_type(annotation) -> tuple[type, list[str] | None]:
    """argparse's ``type`` and ``choices`` for a field: Literal → choices; int/float/str as such;
    anything else (tuples) is text the field's validator parses ("a,b", "NAME=SIZE,...")."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    return (annotation if annotation in _SCALARS else str), None


def _help(name: str, info: FieldInfo) -> str:
    """The field's description and where its default comes from."""
    if name in _filled_by_presets():
        default = "the preset's"
    elif info.default in (None, ()):
        return info.description or ""
    else:
        default = str(info.default)
    return f"{info.description} (default: {default})"


def _filled_by_presets() -> set[str]:
    return {"model"}.union(*({*preset["common"], *preset["model_settings"]} for preset in PRESETS.values()))
