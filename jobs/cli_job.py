"""Job commands: ``cutout submit | status | resume | retry-failed | report | cancel``.

These run on the submitter side: light imports only (no torch, no ``workers``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from pydantic import ValidationError

from cutout.jobs.boxes import add_box_arguments, box_spec_fields
from cutout.jobs.cli import add_connection_args
from cutout.jobs.cli_options import add_pipeline_arguments, chosen_options, options_from_args, validation_message
from cutout.jobs.errors import ConfigError


def register(subparsers) -> None:
    submit = subparsers.add_parser("submit", help="submit a job: SOURCE... --to DEST")
    submit.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="folder, glob, s3:// prefix, list file (.txt/.csv/.jsonl/.parquet) or URI")
    submit.add_argument("--to", dest="destination", help="destination prefix (file:// or s3://); required")
    submit.add_argument("--shard-size", type=int, default=None,
                        help="inputs per shard (default: 32, growing with the job to 1000 past 10^7 inputs)")
    submit.add_argument("--queue", default="cutout", help="queue (job class), e.g. cutout-gpu")
    submit.add_argument("--suffix", default="", help="appended to each output's file stem")
    submit.add_argument("--all-files", action="store_true", help="do not filter sources by image extension")
    submit.add_argument("--incremental", action="store_true",
                        help="add only inputs the job does not list yet (a source that keeps growing)")
    add_pipeline_arguments(submit)
    add_box_arguments(submit)
    add_connection_args(submit)
    submit.set_defaults(func=cmd_submit)

    status = subparsers.add_parser("status", help="live progress of a job")
    _add_job_args(status)
    status.add_argument("--watch", action="store_true", help="refresh until the job finishes")
    status.add_argument("--interval", type=float, default=2.0)
    status.add_argument("--verify", action="store_true",
                        help="count from every shard's stats file instead of the live counters (slow at size)")
    status.set_defaults(func=cmd_status)

    resume = subparsers.add_parser("resume", help="re-enqueue every shard that is not done")
    _add_job_args(resume)
    resume.set_defaults(func=cmd_resume)

    retry = subparsers.add_parser("retry-failed", help="reprocess failed inputs only")
    _add_job_args(retry)
    retry.add_argument("--error-class", default=None, help="only failures of this class, e.g. TransientStorageError")
    retry.add_argument("--input", dest="inputs", action="append", default=[], metavar="URI",
                       help="only this failed input (repeatable), as the manifest names it (a local file: path or file://)")
    retry.set_defaults(func=cmd_retry_failed)

    redo = subparsers.add_parser(
        "redo", help="rerun flagged outputs with other pipeline options (a linked redo job)")
    _add_job_args(redo)
    redo.add_argument("--flag", dest="flags", action="append", default=[], metavar="NAME",
                      help="done outputs carrying this quality flag (repeatable), e.g. empty_alpha")
    redo.add_argument("--input", dest="inputs", action="append", default=[], metavar="URI",
                      help="this input (repeatable), as the manifest names it (a local file: path or file://)")
    add_pipeline_arguments(redo)
    redo.set_defaults(func=cmd_redo)
    redo.epilog = ("Pipeline options not given keep the job's values; a new --preset or --model fills "
                   "again what the old preset chose (as submit with the new flags would).")

    report = subparsers.add_parser("report", help="totals, failures and where the outputs are")
    _add_job_args(report)
    report.add_argument("--json", action="store_true", help="machine-readable summary")
    report.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                        help="also write a self-contained HTML report page into the job's folder "
                             "(DEST/_cutout/jobs/JOB/report.html) and, given PATH, to that local file")
    report.set_defaults(func=cmd_report)

    export = subparsers.add_parser(
        "manifest", help="export the job's manifest (its Parquet parts) as one JSONL, CSV or Parquet file")
    _add_job_args(export)
    export.add_argument("--format", dest="fmt", default="jsonl", choices=("jsonl", "csv", "parquet"),
                        help="jsonl (default), csv (lists and maps as JSON text) or parquet (one file)")
    export.add_argument("--out", required=True, metavar="PATH", help="local file to write ('-': stdout)")
    export.add_argument("--threads", type=int, default=8, help="parts read at once")
    export.set_defaults(func=cmd_manifest)

    cancel = subparsers.add_parser("cancel", help="stop a job: workers skip its remaining shards")
    _add_job_args(cancel)
    cancel.set_defaults(func=cmd_cancel)


def _add_job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB", help="job id printed by `cutout submit`")
    parser.add_argument("--dest", default=None, help="the job's destination (when Redis was lost)")
    add_connection_args(parser)


# --- submit -------------------------------------------------------------------------------------
def build_spec(args: argparse.Namespace):
    from cutout.jobs.spec import JobSpec

    boxes = box_spec_fields(args)  # before the pipeline: --classes may filter COCO annotations
    pipeline = options_from_args(args)
    try:
        return JobSpec(
            sources=tuple(args.sources), destination=args.destination, pipeline=pipeline,
            weights_sha256=_local_weights_sha256(args.weights), shard_size=args.shard_size,
            queue=args.queue, suffix=args.suffix, **boxes,
        )
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from exc


def _local_weights_sha256(weights: str | None) -> str | None:
    """Pin a local weights file by content, so a changed file makes a new job."""
    if not weights:
        return None
    path = weights[len("file://"):] if weights.startswith("file://") else weights
    if "://" in path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cmd_submit(args: argparse.Namespace) -> int:
    from cutout.jobs.submit import submit_incremental, submit_job

    spec = build_spec(args)
    submit = submit_incremental if args.incremental else submit_job
    result = submit(spec, broker_url=args.broker, redis_url=args.redis, all_files=args.all_files)
    print(result.job_id)
    if result.items_new is not None:
        print(f"{result.items_new} new inputs", file=sys.stderr)
    print(
        f"{result.items_total} inputs in {result.shards_total} shards: "
        f"{result.shards_enqueued} enqueued on queue {spec.queue!r} (the rest follow as it drains), "
        f"{result.shards_already_done} already done",
        file=sys.stderr,
    )
    return 0


# --- status -------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    """From the live counters only (no file of the job is read); from the group roll-ups and one
    listing of done-markers when Redis lost the job; from every stats file with ``--verify``."""
    from cutout.jobs.submit import find_job, live_progress, redis_client

    ref = find_job(args.job, destination=args.dest, redis_url=args.redis)
    if args.verify:
        return _print_durable(ref, verify=True)
    from redis.exceptions import RedisError

    progress = live_progress(redis_client(args.redis), ref.job_id)
    try:
        snapshot = progress.snapshot()
    except RedisError:  # Redis down: the job's files still answer
        return _print_durable(ref, verify=False)
    if snapshot.shards_total == 0:  # Redis lost the job (or submit has not started it)
        return _print_durable(ref, verify=False)
    if not args.watch:
        print(format_snapshot(ref.job_id, snapshot, note=_parts_note(ref, snapshot)))
        return job_exit_code(snapshot.finished, snapshot.counts.get("failed", 0))
    return _watch(ref, progress, args.interval)


def _parts_note(ref, snapshot) -> str | None:
    """For a finished job, whether every manifest part is written (a lost build task leaves a
    gap that `report` fills): a few requests (the group size, a listing of the roll-ups)."""
    from cutout.jobs import manifest_parts

    if not snapshot.finished:
        return None
    groups = manifest_parts.groups_total(snapshot.shards_total, manifest_parts.group_shards(ref.prefix))
    written = len(manifest_parts.rollup_groups(ref.prefix))
    if written >= groups:
        return None
    return f"manifest: {written}/{groups} parts written; `cutout report {ref.job_id}` writes the others"


SHARDS_READ_WHEN_LOST = 10  # done shards outside the roll-ups whose stats `status` reads when Redis lost the job


def _print_durable(ref, *, verify: bool) -> int:
    from cutout.jobs import manifest
    from cutout.jobs.progress import ProgressSnapshot
    from cutout.jobs.rollup import Tally

    if verify:
        summary = manifest.summarise_full(ref.prefix)
        note = "counted from every shard's stats file"
    else:
        summary = manifest.summarise(ref.prefix, read_limit=SHARDS_READ_WHEN_LOST)
        note = "from the job's files (live progress is not in Redis; `cutout resume` restores it)"
        if summary.uncounted_shards:
            note += f"; {summary.uncounted_shards} done shard(s) of unfinished groups not in the counts"
    tally = Tally(summary.counts, summary.error_classes, summary.flag_counts, summary.stage_seconds)
    snap = ProgressSnapshot(total=summary.items_total or 0, counts=summary.counts,
                            shards_done=summary.shards_done, shards_total=summary.shards_total, tally=tally)
    print(format_snapshot(ref.job_id, snap, note=note))
    return job_exit_code(summary.complete, summary.counts.get("failed", 0))


def job_exit_code(complete: bool, failed: int) -> int:
    """0 all done, 3 finished with failed inputs, 4 not finished (README, "Exit codes")."""
    from cutout.jobs.cli import EXIT_INCOMPLETE, EXIT_OK, EXIT_SOME_FAILED

    if not complete:
        return EXIT_INCOMPLETE
    return EXIT_SOME_FAILED if failed else EXIT_OK


def format_snapshot(job_id: str, snap, note: str | None = None) -> str:
    processed = sum(snap.counts.values())
    percent = 100.0 * processed / snap.total if snap.total else 0.0
    eta = f"{snap.eta_s:.0f} s" if snap.eta_s is not None else "?"
    counts = ", ".join(f"{k} {v}" for k, v in sorted(snap.counts.items())) or "nothing yet"
    state = " (cancelled)" if snap.cancelled else " (finished)" if snap.finished else ""
    lines = [
        f"job {job_id}{state}: {processed}/{snap.total} inputs "
        f"({percent:.1f} %), shards {snap.shards_done}/{snap.shards_total}, "
        f"{snap.in_flight} in flight, {snap.workers_alive} workers alive",
        f"  {counts}; rate {snap.rate_per_s or 0:.2f}/s; ETA {eta}",
    ]
    errors, flags, seconds = snap.tally.error_classes, snap.tally.flag_counts, snap.tally.stage_seconds
    if errors:
        lines.append("  top errors: " + ", ".join(f"{k} ×{v}" for k, v in list(errors.items())[:5]))
    if flags:
        lines.append("  quality flags: " + ", ".join(f"{k} ×{v}" for k, v in flags.items()))
    if seconds and processed:
        lines.append("  seconds per input: " + ", ".join(
            f"{k} {v / processed:.3f}" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])[:6]))
    if note:
        lines.append(f"  ({note})")
    return "\n".join(lines)


def _watch(ref, progress, interval: float) -> int:
    from cutout.jobs.cli import progress_bar

    snap = progress.snapshot()
    with progress_bar(snap.total or None, desc=ref.job_id, interval_s=interval) as bar:
        while True:
            snap = progress.snapshot()
            bar.total = snap.total or bar.total
            bar.n = snap.processed
            bar.set_postfix(
                failed=snap.counts.get("failed", 0), in_flight=snap.in_flight,
                workers=snap.workers_alive, eta=f"{snap.eta_s:.0f}s" if snap.eta_s else "?",
            )
            bar.refresh()
            if snap.finished:
                break
            if snap.cancelled:
                print("job cancelled", file=sys.stderr)
                return job_exit_code(False, 0)
            time.sleep(interval)
    print(format_snapshot(ref.job_id, snap, note=_parts_note(ref, snap)))
    return job_exit_code(True, snap.counts.get("failed", 0))


# --- resume / retry / cancel --------------------------------------------------------------------
def cmd_resume(args: argparse.Namespace) -> int:
    from cutout.jobs.submit import resume_job

    result = resume_job(args.job, destination=args.dest, broker_url=args.broker, redis_url=args.redis)
    print(
        f"job {result.job_id}: {result.shards_enqueued} shards re-enqueued (the rest follow as the "
        f"queue drains), {result.shards_already_done}/{result.shards_total} already done"
    )
    return 0


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from cutout.jobs.submit import retry_failed

    result = retry_failed(
        args.job, error_class=args.error_class, inputs=tuple(args.inputs), destination=args.dest,
        broker_url=args.broker, redis_url=args.redis,
    )
    print(f"job {result.job_id}: {result.items_to_retry} failed inputs in {result.shards_enqueued} shards re-enqueued")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from cutout.jobs.submit import cancel_job

    ref = cancel_job(args.job, destination=args.dest, redis_url=args.redis)
    print(f"job {ref.job_id} cancelled; `cutout resume {ref.job_id}` starts it again")
    return 0


def cmd_redo(args: argparse.Namespace) -> int:
    from cutout.jobs.submit import redo_outputs

    result = redo_outputs(
        args.job, flags=tuple(args.flags), inputs=tuple(args.inputs), overrides=chosen_options(args),
        destination=args.dest, broker_url=args.broker, redis_url=args.redis,
    )
    print(result.job_id)
    print(f"redo of job {result.parent_job_id}: {result.items} inputs in {result.shards_enqueued} shards "
          f"enqueued (config {result.config_hash[:12]}); the job's manifest lists their new records "
          "once the redo finishes", file=sys.stderr)
    return 0


# --- report -------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from cutout.jobs.submit import job_report

    report = job_report(args.job, destination=args.dest, redis_url=args.redis)
    if args.html is not None:
        from cutout.jobs.report_html import write_report

        report["html"] = write_report(report["job_prefix"], report["job_id"], local_path=args.html or None)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return job_exit_code(report["complete"], report["counts"].get("failed", 0))


def format_report(report: dict) -> str:
    lines = [
        f"job {report['job_id']}: {'complete' if report['complete'] else 'not finished'} "
        f"({report['shards_done']}/{report['shards_total']} shards)",
        "  " + ", ".join(f"{k}: {v}" for k, v in sorted(report["counts"].items())),
        f"  outputs:  {report['destination']}",
        f"  records:  {report['job_prefix']}",
    ]
    if report.get("manifest_uri"):
        lines.append(f"  manifest: {report['manifest_uri']}*.parquet ({report['manifest_parts']} parts written; "
                     f"`cutout manifest {report['job_id']} --out FILE` for one file)")
    if report.get("uncounted_shards"):
        lines.append(f"  ({report['uncounted_shards']} done shards of unfinished groups are not in these counts)")
    if report.get("skipped"):
        lines.append("  source entries skipped: " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
    if report["error_classes"]:
        lines.append("  failures by class:")
        for name, count in sorted(report["error_classes"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {count:>8}  {name}")
    if report["top_errors"]:
        lines.append("  most common messages:")
        for message, count in list(report["top_errors"].items())[:10]:
            lines.append(f"    {count:>8}  {message}")
    for uri in report.get("html") or ():
        lines.append(f"  report page: {uri}")
    if report.get("flag_counts"):
        lines.append("  quality flags (done outputs to look at; `cutout redo JOB --flag NAME`):")
        for name, count in report["flag_counts"].items():
            lines.append(f"    {count:>8}  {name}")
    return "\n".join(lines)


# --- manifest export ----------------------------------------------------------------------------
def cmd_manifest(args: argparse.Namespace) -> int:
    from cutout.jobs.manifest_export import export_manifest
    from cutout.jobs.submit import find_job, load_job_spec

    ref = find_job(args.job, destination=args.dest, redis_url=args.redis)
    load_job_spec(ref)
    result = export_manifest(ref.prefix, args.fmt, args.out, threads=args.threads)
    print(f"{result.rows} rows from {result.parts} parts written to {args.out}"
          + (f"; {result.groups_missing} group(s) not finished yet" if result.groups_missing else ""),
          file=sys.stderr)
    return job_exit_code(result.groups_missing == 0 and result.parts > 0, 0)
