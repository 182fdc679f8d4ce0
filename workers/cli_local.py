"""``cutout run`` (local files and folders, no queue) and ``cutout eval`` (quality figures).

Light at import: torch and the pipeline load only when a command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from cutout.jobs.boxes import add_box_arguments, annotation_classes
from cutout.jobs.cli_options import add_pipeline_arguments, options_from_args
from cutout.jobs.settings import settings

BENCHMARK_SETS = ("alphamatting_lowres", "grabcut_msrc")  # what workers/evaluate.py reads
PARTIAL_FAILURE_EXIT = 3  # some inputs failed; the others were written
INTERRUPTED_EXIT = 130  # Ctrl-C, as a shell reports it


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="remove backgrounds from local files and folders")
    run.add_argument("inputs", nargs="*", metavar="INPUT", help="image files and/or folders")
    run.add_argument("--out", help="output folder (relative paths are mirrored); required")
    run.add_argument("--trimaps", metavar="DIR",
                     help="hand-made trimaps: DIR/<input's relative path, .png> (0 bg, 128 unknown, 255 fg)")
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--overwrite", action="store_true",
                     help="redo every input (default: skip inputs already done with the same settings)")
    add_pipeline_arguments(run)
    add_box_arguments(run)
    run.set_defaults(func=run_command)

    evaluate = subparsers.add_parser(
        "eval", help="quality and speed (CPU-seconds and wall time) on ../shared/testdata or your own photos")
    evaluate.add_argument(
        "--data", help="a folder with image/ and alpha/ (soft mattes) or mask/ (0 bg, 255 fg, 128 left "
                       "out), matched by file stem; default: the benchmark sets in $CUTOUT_EVAL_DATA "
                       "or ../shared/testdata")
    evaluate.add_argument(
        "--boxes", help="score with box hints: a folder of box masks by file stem (GrabCut's rect/: "
                        "the box around the pixels >= 128) or a .json {stem: [x, y, w, h]}; needs --data")
    evaluate.add_argument("--out", default="eval-output")
    evaluate.add_argument("--limit", type=int, help="only the first N photos of each set")
    evaluate.add_argument("--skip-matting-only", action="store_true")
    evaluate.add_argument("--skip-segmentation", action="store_true")
    add_pipeline_arguments(evaluate)
    evaluate.set_defaults(func=eval_command)


def run_command(args: argparse.Namespace) -> int:
    """Run every input through the one item loop into a local folder; resumable, stoppable.

    Exit codes: 0 all written, 3 some inputs failed (the others were written), 130 stopped
    by Ctrl-C (the records so far are kept; a rerun does the rest).
    """
    from cutout.jobs.cli import progress_bar
    from cutout.jobs.storage import ListingSkips
    from cutout.workers.items import FolderRecords, run_items
    from cutout.workers.models.base import check_device

    check_device(args.device)  # before anything is written
    annotation_classes(args)  # with a COCO source --classes filters annotations (cutout.jobs.boxes)
    options = options_from_args(args)
    _check_trimaps_folder(args.trimaps)
    out_dir = _local_out_dir(args.out)
    listing_skips = ListingSkips()
    items = _run_items_plan(args.inputs, out_dir, options.extension, listing_skips, args)
    started = time.perf_counter()
    sink = FolderRecords(out_dir)
    todo = _not_done(items, sink, options.config_hash(), overwrite=args.overwrite)
    try:
        pipeline = _loaded_pipeline(options, args.device) if todo else None  # before any write
    except KeyboardInterrupt:
        print("interrupted while loading the model: nothing was processed", file=sys.stderr)
        return INTERRUPTED_EXIT
    bar = progress_bar(len(todo), disable=args.no_progress)
    summary = _RunSummary(bar, listing_skips)
    summary.skipped = len(items) - len(todo)
    sink.on_record = summary.add
    try:
        run_items(
            todo,
            pipeline=lambda: pipeline,
            sink=sink,
            record_fields={"model": options.model, "config_hash": options.config_hash()},
            trimaps=(lambda item: _user_trimap(args.trimaps, item.rel_key)) if args.trimaps else None,
            batch_size=max(1, args.batch_size),
        )
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        sink.close()
    summary.print(len(items), time.perf_counter() - started, out_dir, sink.path)
    if summary.interrupted:
        return INTERRUPTED_EXIT
    return PARTIAL_FAILURE_EXIT if summary.failures else 0


def _local_out_dir(out: str) -> str:
    """``--out`` as an absolute local folder; object stores are refused before anything runs."""
    from cutout.jobs.errors import ConfigError
    from cutout.jobs.storage import _local_path, scheme_of

    if scheme_of(out) != "local":
        raise ConfigError(
            f"cutout run writes to a local folder, not {out!r}: for a bucket use "
            f"`cutout submit SOURCE --to {out}` (with `cutout worker`), or run into a folder and copy it")
    out_dir = os.path.realpath(_local_path(out))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out!r} is a file, not a folder: give a folder (it is made if missing)")
    try:  # made now, so a path that cannot be a folder fails before the model loads
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out!r} cannot be made a folder: {exc.strerror or exc} "
                          f"({_blocking_parent(out_dir)})") from None
    return out_dir


def _blocking_parent(path: str) -> str:
    """The nearest existing folder above ``path``, or the file in the way, for the message."""
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f"{parent} is a file"
    return f"below {parent}"


def _check_trimaps_folder(folder: str | None) -> None:
    """A ``--trimaps`` folder that is not there is a mistake, not "no hand trimaps"."""
    from cutout.jobs.errors import ConfigError

    if folder is not None and not os.path.isdir(folder):
        raise ConfigError(f"--trimaps {folder!r}: no such folder (DIR/<input's relative path>.png, "
                          "0 background, 128 unknown, 255 foreground)")


def _run_items_plan(inputs: list[str], out_dir: str, extension: str, skips, args=None) -> list:
    """The inputs with collision-free output keys, as ``submit`` gives them (``jobs.sharding``).

    Inputs inside ``out_dir`` are left out (an output folder inside an input folder is never
    read back), and a name that cannot be an output key gets ``_unnamed/<hash>``. A list file's
    box column (``--box-column``) and a COCO file give one input per box, as in ``submit``.
    """
    from cutout.jobs.boxes import BoxExpander
    from cutout.jobs.sharding import iter_shards
    from cutout.jobs.sources import iter_source_items

    inside_out = out_dir.rstrip(os.sep) + os.sep
    boxes = None if args is None else BoxExpander(
        args.box_column, args.box_format, images=args.images, classes=annotation_classes(args))
    sources = (item for item in iter_source_items(inputs, skips=skips, boxes=boxes)
               if not os.path.realpath(item.uri).startswith(inside_out))
    shards = iter_shards(sources, destination=out_dir, extension=extension, shard_size=10_000)
    return [item for shard in shards for item in shard.items]


def _not_done(items: list, sink, config_hash: str, *, overwrite: bool) -> list:
    """Items to run: all with ``--overwrite``, else those not already done with these settings."""
    from cutout.jobs.boxes import image_uri_of

    todo = []
    for item in items:
        fingerprint = _fingerprint(image_uri_of(item.uri, item.extra))
        sink.expect(item, fingerprint)
        if overwrite or not sink.already_done(item, fingerprint, config_hash):
            todo.append(item)
    return todo


def _fingerprint(uri: str) -> str | None:
    """Size and modification time of a local input (None for a remote one: always redone)."""
    from cutout.jobs.storage import _local_path, scheme_of

    if scheme_of(uri) != "local":
        return None
    try:
        stat = os.stat(_local_path(uri))
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _loaded_pipeline(options, device: str | None):
    """The pipeline with its model loaded, made only when some input needs it (a rerun with
    nothing left to do never loads a model); a missing dependency stops here, before any write."""
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(options, device=device)
    print(f"model {options.model} loaded in {pipeline.load_models():.1f} s", file=sys.stderr)
    return pipeline


def _user_trimap(folder: str | None, rel_key: str) -> bytes | None:
    """The trimap for one input, if the user gave a folder and it holds one."""
    if not folder:
        return None
    path = (Path(folder) / rel_key).with_suffix(".png")
    return path.read_bytes() if path.is_file() else None


class _RunSummary:
    """Counts and failure lines as records arrive; the closing summary."""

    def __init__(self, bar, listing_skips):
        self.bar = bar
        self.listing_skips = listing_skips
        self.done = 0
        self.failures: Counter[str] = Counter()
        self.skipped = 0
        self.interrupted = False

    def add(self, record) -> None:
        if record.status == "done":
            self.done += 1
        else:
            self.failures[record.error_class or "Error"] += 1
            self.bar.write(f"failed: {record.input_uri!r}: {record.error_class}: {record.error}",
                           file=sys.stderr)
        self.bar.update(1)

    def print(self, total: int, seconds: float, out_dir: str, records_path: str) -> None:
        failed = sum(self.failures.values())
        if self.interrupted:
            print(f"interrupted: {total - self.skipped - self.done - failed} input(s) not processed "
                  "(run the same command again to finish)")
        print(f"processed {self.done}, failed {failed} of {total} in {seconds:.2f} s -> {out_dir}")
        if self.skipped:
            print(f"already done with these settings (skipped; --overwrite redoes them): {self.skipped}")
        for error_class, count in self.failures.most_common():
            print(f"  {count:6d}  {error_class}")
        if self.listing_skips.total:
            reasons = ", ".join(f"{count} {reason}" for reason, count in self.listing_skips.counts.items())
            print(f"not inputs (skipped by the listing): {reasons}")
        print(f"per-item records: {records_path}")


def eval_command(args: argparse.Namespace) -> int:
    from cutout.workers.evaluate import is_user_folder, run_eval, run_user_eval

    options = options_from_args(args)
    data = Path(args.data or settings().eval_data)
    _check_eval_data(data, is_user_folder(data), args.skip_segmentation)
    if args.boxes and not is_user_folder(data):
        from cutout.jobs.errors import ConfigError

        raise ConfigError("--boxes needs --data DIR with image/ and mask/ (or alpha/)")
    if is_user_folder(data):
        boxes = None
        if args.boxes:
            from cutout.workers.boxes import load_eval_boxes

            boxes = load_eval_boxes(args.boxes)
        report = run_user_eval(options, data, Path(args.out), limit=args.limit, boxes=boxes)
        print(json.dumps(report["summary"], default=float))
        return 0
    report = run_eval(options, data, Path(args.out), limit=args.limit,
                      skip_matting_only=args.skip_matting_only,
                      skip_segmentation=args.skip_segmentation)
    print(json.dumps({k: report["end_to_end"][k] for k in ("mask", "full", "seconds_per_image_median",
                      "cpu_seconds_per_image_median")}, default=float))
    return 0


def _check_eval_data(data: Path, users_own: bool, skip_segmentation: bool) -> None:
    """``--data`` is a folder eval can score, said before any model loads."""
    from cutout.jobs.errors import ConfigError

    layout = ("image/ plus alpha/ (soft mattes) or mask/ (0 background, 255 foreground), "
              "matched by file stem")
    if not data.is_dir():
        raise ConfigError(f"--data {str(data)!r}: no such folder; give a folder with {layout}")
    if users_own:
        if not any(p.is_file() for p in (data / "image").iterdir()):
            raise ConfigError(f"--data {str(data)!r}: image/ is empty")
        return
    needed = BENCHMARK_SETS[:1] if skip_segmentation else BENCHMARK_SETS
    if not all((data / name / "image").is_dir() for name in needed):
        raise ConfigError(f"--data {str(data)!r} has neither {layout} nor the benchmark sets "
                          f"({', '.join(needed)})")
