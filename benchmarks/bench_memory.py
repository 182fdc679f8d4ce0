"""RAM per megapixel: peak RSS of a whole ``cutout run`` process on one synthetic photo per size.

Why: ``--max-pixels`` decides how large an input a machine accepts, and what it costs in
memory is what a user needs to choose it. Each size runs in its own ``cutout run`` process
(model load included, as a user sees it); the kernel's rusage of that process gives its peak
RSS and CPU-seconds (user+sys), printed beside wall time. A least-squares line over the sizes
gives the fixed part (interpreter, libraries, model) and the megabytes per megapixel.

    python benchmarks/bench_memory.py [--megapixels 4 16 36 64] [-- extra `cutout run` flags]
    python benchmarks/bench_memory.py -- --model threshold
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large_image import synthetic_photo  # noqa: E402  (the same disc-on-backdrop JPEG)


def measure(megapixels: float, workdir: Path, extra: list[str]) -> dict:
    """One ``cutout run`` on one photo: peak RSS (MB), wall and CPU seconds, exit status."""
    folder = workdir / f"in-{megapixels:g}"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(synthetic_photo(megapixels))
    argv = [sys.executable, "-m", "cutout.jobs.cli", "run", str(folder), "--out", str(workdir / f"out-{megapixels:g}"),
            "--no-progress", "--max-pixels", str(int(megapixels * 1e6) + 1_000_000), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    errors = process.stderr.read().decode(errors="replace").strip() if process.returncode else ""
    process.stderr.close()
    return {"megapixels": megapixels, "peak_mb": usage.ru_maxrss / 1024, "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "exit": process.returncode, "errors": errors}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Intercept and slope of the least-squares line through the points."""
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[4, 16, 36, 64])
    parser.add_argument("extra", nargs="*", help="flags passed to `cutout run` (after --)")
    args = parser.parse_args()

    print(f"cutout run {' '.join(args.extra) or '(default preset)'}; one synthetic JPEG per size, "
          f"{os.cpu_count()} CPUs")
    print(f"{'MP':>5} {'peak RSS MB':>12} {'wall s':>8} {'CPU s':>8}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cutout-bench-memory-") as workdir:
        for megapixels in args.megapixels:
            row = measure(megapixels, Path(workdir), args.extra)
            rows.append(row)
            print(f"{megapixels:>5g} {row['peak_mb']:>12,.0f} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f}"
                  + (f"  exit {row['exit']}: {row['errors'][-300:]}" if row["exit"] else ""), flush=True)
    good = [row for row in rows if row["exit"] == 0]
    if len(good) >= 2:
        fixed, per_mp = fit_line([r["megapixels"] for r in good], [r["peak_mb"] for r in good])
        print(f"peak RSS ~ {fixed:,.0f} MB + {per_mp:,.0f} MB per megapixel (least squares, {len(good)} sizes)")


if __name__ == "__main__":
    main()
