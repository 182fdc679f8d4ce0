"""The ``cutout`` command. Each command module adds its own subcommands via ``register``.

Command modules must stay light at import (no torch at module level): the submitter's
``cutout submit`` must start fast and never load torch.

Errors end as one line on stderr with a hint and a documented exit code (README, "Exit
codes"); ``--debug`` or ``CUTOUT_DEBUG=1`` prints the traceback too.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

EXIT_OK = 0
EXIT_ERROR = 1  # an error without a code of its own (a bug, say: --debug shows the traceback)
EXIT_USAGE = 2  # bad flags, job file or settings; a missing extra
EXIT_SOME_FAILED = 3  # finished, but some inputs failed (their records say why)
EXIT_INCOMPLETE = 4  # the job is not finished (still running, or cancelled)
EXIT_UNREACHABLE = 5  # Redis (broker or live progress) cannot be reached
EXIT_INTERRUPTED = 130  # Ctrl-C

COMMAND_MODULES = (
    "cutout.workers.cli_local",  # run, eval
    "cutout.workers.models.cli",  # models list|fetch|info
    "cutout.workers.cli_worker",  # worker
    "cutout.jobs.cli_job",  # submit, status, resume, retry-failed, report, cancel
)
JOB_FILE_COMMANDS = ("run", "submit")
# Modules of the [worker] extra: a command that needs one says how to install it.
WORKER_EXTRA_MODULES = {"torch", "torchvision", "cv2", "pymatting", "onnx", "onnxruntime", "numba"}
# Not on PyPI yet: the extra is installed from the repository (README, "Install").
WORKER_EXTRA_HINT = "install the worker extra: pip install -e '.[worker]' in a clone of the repository"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and a pointer to --help, not a usage block."""

    def error(self, message: str):
        print(f"cutout: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """``--broker`` / ``--redis``: one Redis serves both unless ``--redis`` (or CUTOUT_REDIS_URL)
    names another (resolved in ``cutout.jobs.preflight.resolve_connection``)."""
    parser.add_argument("--broker", default=None, help="broker URL (env CUTOUT_BROKER_URL)")
    parser.add_argument("--redis", default=None,
                        help="live-progress Redis URL (env CUTOUT_REDIS_URL; default: the broker)")


LOG_LINE_INTERVAL_S = 10.0  # seconds between progress lines when output is not a terminal


def progress_bar(total: int | None, *, desc: str | None = None, disable: bool = False,
                 interval_s: float = LOG_LINE_INTERVAL_S):
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) one plain line per interval,
    since tqdm's ``\\r`` frames make a log unreadable."""
    if disable or sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc=desc, disable=disable, file=sys.stderr)
    return LineProgress(total, desc=desc, interval_s=interval_s)


class LineProgress:
    """The part of tqdm's interface the commands use, printing whole lines to stderr."""

    def __init__(self, total: int | None, *, desc: str | None = None, interval_s: float):
        self.total, self.n, self.desc, self.interval_s = total, 0, desc, interval_s
        self.postfix: dict = {}
        self.counted = False  # update() calls: the rate is ours (a watched job's is not)
        self.started = self.printed_at = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.n += count
        self.counted = True
        if time.monotonic() - self.printed_at >= self.interval_s:
            self.refresh()

    def set_postfix(self, **fields) -> None:
        self.postfix = fields

    def refresh(self) -> None:
        self.printed_at = time.monotonic()
        elapsed = self.printed_at - self.started
        of = f"/{self.total}" if self.total else ""
        percent = f" ({100.0 * self.n / self.total:.1f} %)" if self.total else ""
        extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
        rate = f", {self.n / elapsed:.2f}/s" if self.counted and elapsed > 0 else ""
        print(f"{self.desc + ': ' if self.desc else ''}{self.n}{of} inputs{percent}{rate}, "
              f"{elapsed:.0f} s{extra}", file=sys.stderr, flush=True)

    @staticmethod
    def write(message: str, file=None) -> None:
        print(message, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        self.refresh()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_parser() -> argparse.ArgumentParser:
    from cutout import __version__

    parser = OneLineParser(
        prog="cutout",
        description="Background removal at dataset scale: local runs, distributed jobs, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"cutout {__version__}")
    parser.add_argument("--debug", action="store_true", help="print tracebacks (or CUTOUT_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for name, sub in subparsers.choices.items():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print tracebacks (or CUTOUT_DEBUG=1)")
        if name in JOB_FILE_COMMANDS:
            sub.add_argument("--config", metavar="JOB.toml",
                             help="job file: the job spec's fields in TOML; flags override it")
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, over a job file's values when ``--config`` names one."""
    from cutout.jobs import jobfile

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in JOB_FILE_COMMANDS:
        sub = _subparser(parser, args.command)
        if args.config:
            jobfile.apply_job_file(sub, args.command, args.config)
            args = parser.parse_args(argv)
        jobfile.require_sources_and_destination(sub, args)
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(EXIT_USAGE)
    return args


def main(argv: list[str] | None = None) -> int:
    from cutout.jobs.redact import install_log_redaction

    install_log_redaction()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or _debug_setting()
    try:
        args = parse(argv)
        from cutout.jobs.preflight import run_checks

        run_checks(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cutout: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every error ends here: one line, a hint, a documented code
        if debug:
            traceback.print_exc()
        code, message = describe_error(exc)
        print(f"cutout: error: {message}", file=sys.stderr)
        return code


def _debug_setting() -> bool:
    from cutout.jobs.errors import ConfigError
    from cutout.jobs.settings import settings

    try:
        return settings().debug
    except ConfigError:
        return False


def describe_error(exc: BaseException) -> tuple[int, str]:
    """Exit code and one line (secrets removed) for an error that reached the top."""
    from cutout.jobs.errors import ConfigError, CutoutError, MissingWeightsError, ServiceUnavailableError
    from cutout.jobs.redact import redact as redact_url

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ServiceUnavailableError):
        return EXIT_UNREACHABLE, redact_url(text)
    if _is_connection_error(exc):
        return EXIT_UNREACHABLE, redact_url(
            f"cannot reach Redis: {text}; is redis-server running? check CUTOUT_BROKER_URL / "
            "CUTOUT_REDIS_URL or --broker / --redis")
    if isinstance(exc, (ConfigError, MissingWeightsError)):  # the message names the fix
        return EXIT_USAGE, redact_url(text)
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in WORKER_EXTRA_MODULES:
        return EXIT_USAGE, f"this command needs the worker extra (module {exc.name!r} is missing): {WORKER_EXTRA_HINT}"
    if isinstance(exc, CutoutError):
        return EXIT_ERROR, redact_url(text)
    return EXIT_ERROR, redact_url(f"unexpected {type(exc).__name__}: {text} "
                                  "(run with --debug or CUTOUT_DEBUG=1 for the traceback)")


def _is_connection_error(exc: BaseException) -> bool:
    """redis-py and kombu connection failures (raised after the preflight, e.g. Redis went away)."""
    import redis
    from kombu.exceptions import OperationalError

    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError))


if __name__ == "__main__":
    sys.exit(main())
