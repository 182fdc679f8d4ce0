"""``cutout run`` (local files and folders, no queue) and ``cutout eval`` (quality figures).

Light at import: torch and the pipeline load only when a command runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from cutout.jobs.cli_options import add_pipeline_arguments, options_from_args

PARTIAL_FAILURE_EXIT = 3  # some inputs failed; the others were written


def register(subparsers) -> None:
    run = subparsers.add_parser("run", help="remove backgrounds from local files and folders")
    run.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    run.add_argument("--out", required=True, help="output folder (relative paths are mirrored)")
    run.add_argument("--trimaps", metavar="DIR",
                     help="hand-made trimaps: DIR/<input's relative path, .png> (0 bg, 128 unknown, 255 fg)")
    run.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    run.add_argument("--no-progress", action="store_true")
    add_pipeline_arguments(run)
    run.set_defaults(func=run_command)

    evaluate = subparsers.add_parser(
        "eval", help="quality and speed (CPU-seconds and wall time) on ../shared/testdata or your own photos")
    evaluate.add_argument(
        "--data", help="a folder with image/ and alpha/ (soft mattes) or mask/ (0 bg, 255 fg, 128 left "
                       "out), matched by file stem; default: the benchmark sets in $CUTOUT_EVAL_DATA "
                       "or ../shared/testdata")
    evaluate.add_argument("--out", default="eval-output")
    evaluate.add_argument("--limit", type=int, help="only the first N photos of each set")
    evaluate.add_argument("--skip-matting-only", action="store_true")
    evaluate.add_argument("--skip-segmentation", action="store_true")
    add_pipeline_arguments(evaluate)
    evaluate.set_defaults(func=eval_command)


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cutout.jobs.errors import CutoutError
    from cutout.jobs.records import ItemRecord
    from cutout.jobs.sharding import output_uri
    from cutout.jobs.sources import iter_source_items
    from cutout.jobs.storage import read_bytes, write_bytes
    from cutout.workers.pipeline import Pipeline

    options = options_from_args(args)
    pipeline = Pipeline(options, device=args.device)
    items = list(iter_source_items(args.inputs))
    out_dir = Path(args.out).resolve()
    print(f"model {options.model} loaded in {pipeline.load_models():.1f} s", file=sys.stderr)
    records: list[ItemRecord] = []
    failures: Counter[str] = Counter()
    start = time.perf_counter()
    bar = tqdm(total=len(items), unit="img", disable=args.no_progress, file=sys.stderr)
    for batch in _batches(items, max(1, args.batch_size)):
        loaded, records_batch = [], []
        for item in batch:
            try:
                loaded.append((item, read_bytes(item.uri, max_bytes=512 * 1024 * 1024)))
            except CutoutError as exc:
                records_batch.append(_failed_record(item.uri, exc))
        trimaps = [_user_trimap(args.trimaps, item.rel_key) for item, _ in loaded]
        outcomes = pipeline.process_batch([(item.uri, data) for item, data in loaded], trimaps)
        for (item, _), outcome in zip(loaded, outcomes):
            if outcome.ok:
                target = output_uri(str(out_dir), item.rel_key, options.extension)
                write_bytes(target, outcome.data)
                records_batch.append(ItemRecord(
                    input_uri=item.uri, output_uris=[target], status="done", notes=outcome.notes,
                    timings=outcome.timings, width=outcome.width, height=outcome.height,
                    model=options.model, config_hash=options.config_hash()))
            else:
                records_batch.append(_failed_record(item.uri, outcome.error, outcome.timings))
        for record in records_batch:
            if record.status == "failed":
                failures[record.error_class or "Error"] += 1
                tqdm.write(f"failed: {record.input_uri}: {record.error_class}: {record.error}",
                           file=sys.stderr)
        records.extend(records_batch)
        bar.update(len(batch))
    bar.close()
    _write_run_manifest(out_dir, records)
    _print_run_summary(records, failures, time.perf_counter() - start, out_dir)
    return PARTIAL_FAILURE_EXIT if failures else 0


def _user_trimap(folder: str | None, rel_key: str) -> bytes | None:
    """The trimap for one input, if the user gave a folder and it holds one."""
    if not folder:
        return None
    path = (Path(folder) / rel_key).with_suffix(".png")
    return path.read_bytes() if path.is_file() else None


def _failed_record(uri: str, error, timings=None):
    from cutout.jobs.records import ItemRecord

    return ItemRecord(input_uri=uri, status="failed", stage=error.stage,
                      error_class=error.error_class, error=str(error), timings=timings or {})


def _write_run_manifest(out_dir: Path, records) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "_cutout_run.jsonl", "w") as handle:
        for record in records:
            handle.write(record.model_dump_json() + "\n")


def _print_run_summary(records, failures: Counter, seconds: float, out_dir: Path) -> None:
    done = sum(1 for r in records if r.status == "done")
    print(f"processed {done}, failed {len(records) - done} of {len(records)} "
          f"in {seconds:.2f} s -> {out_dir}")
    for error_class, count in failures.most_common():
        print(f"  {count:6d}  {error_class}")
    print(f"per-item records: {out_dir / '_cutout_run.jsonl'}")


def eval_command(args: argparse.Namespace) -> int:
    from cutout.workers.evaluate import DEFAULT_DATA, is_user_folder, run_eval, run_user_eval

    options = options_from_args(args)
    data = Path(args.data or DEFAULT_DATA)
    if is_user_folder(data):
        report = run_user_eval(options, data, Path(args.out), limit=args.limit)
        print(json.dumps(report["summary"], default=float))
        return 0
    report = run_eval(options, data, Path(args.out), limit=args.limit,
                      skip_matting_only=args.skip_matting_only,
                      skip_segmentation=args.skip_segmentation)
    print(json.dumps({k: report["end_to_end"][k] for k in ("mask", "full", "seconds_per_image_median",
                      "cpu_seconds_per_image_median")}, default=float))
    return 0
