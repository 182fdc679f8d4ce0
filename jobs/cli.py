"""The ``cutout`` command. Each command module adds its own subcommands via ``register``.

Command modules must stay light at import (no torch at module level): the submitter's
``cutout submit`` must start fast and never load torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "cutout.workers.cli_local",  # run, eval
    "cutout.workers.models.cli",  # models list|fetch|info
    "cutout.workers.cli_worker",  # worker
    "cutout.jobs.cli_job",  # submit, status, resume, retry-failed, report, cancel
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cutout",
        description="Background removal at dataset scale: local runs, distributed jobs, evaluation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from cutout.jobs.errors import CutoutError
    from cutout.jobs.redact import install_log_redaction, redact

    install_log_redaction()
    try:
        return int(args.func(args) or 0)
    except CutoutError as exc:
        print(f"cutout: error: {redact(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
