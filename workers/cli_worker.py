"""``cutout worker``: start a Celery worker with sane defaults for this machine.

One pool process per GPU when GPUs are present (each pinned to its own GPU, round robin), or
``--processes-per-gpu N`` of them: the CPU stages after the model (refine, matte, foreground,
encode: about 0.25 s per 800-px photo on one core, docs/results.md) take far longer than a
GPU's model pass, so several processes per GPU keep it busy. Without GPUs, about one process
per two CPU cores, with torch's threads split between them. Importing this module
is cheap: torch is never imported here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess

from cutout.jobs.settings import settings


def register(subparsers) -> None:
    parser = subparsers.add_parser("worker", help="start a Celery worker that processes shards")
    parser.add_argument("--queues", "-Q", default=settings().queues,
                        help="comma-separated queues to consume (default: %(default)s)")
    parser.add_argument("--concurrency", "-c", type=int, default=None,
                        help="pool processes (default: one per GPU, else one per 2 CPU cores)")
    parser.add_argument("--processes-per-gpu", type=int,
                        default=settings().processes_per_gpu,
                        help="pool processes sharing each GPU (default: %(default)s)")
    parser.add_argument("--pool", choices=("prefork", "solo", "threads"), default="prefork")
    parser.add_argument("--loglevel", "-l", default="INFO")
    parser.add_argument("--hostname", "-n", default=None, help="worker node name (celery -n)")
    parser.add_argument("--max-tasks-per-child", type=int, default=None)
    parser.set_defaults(func=run_worker)


def count_gpus() -> int:
    """GPUs this worker may use, without importing torch (so forked children can start CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([g for g in visible.split(",") if g.strip() and g.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def worker_plan(concurrency: int | None, cpu_count: int, gpu_count: int,
                processes_per_gpu: int = 1) -> dict[str, str]:
    """Concurrency and the environment its pool processes inherit."""
    env: dict[str, str] = {}
    if gpu_count > 0:
        processes = concurrency or gpu_count * max(1, processes_per_gpu)
        env["CUTOUT_WORKER_GPUS"] = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(
            str(i) for i in range(gpu_count)
        )
        threads = max(1, cpu_count // processes)
    else:
        processes = concurrency or max(1, cpu_count // 2)
        threads = max(1, cpu_count // processes)
        env["CUTOUT_DEVICE"] = settings().device or "cpu"
    env["CUTOUT_THREADS"] = str(settings().threads or threads)  # read by cutout.workers.segment
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(threads))
    env["CUTOUT_CONCURRENCY"] = str(processes)
    return env


def run_worker(args: argparse.Namespace) -> int:
    plan = worker_plan(args.concurrency, os.cpu_count() or 1, count_gpus(), args.processes_per_gpu)
    os.environ.update(plan)
    if args.max_tasks_per_child:
        os.environ["CUTOUT_MAX_TASKS_PER_CHILD"] = str(args.max_tasks_per_child)
    from cutout.workers.celery_app import app

    argv = [
        "worker",
        f"--queues={args.queues}",
        f"--concurrency={plan['CUTOUT_CONCURRENCY']}",
        f"--pool={args.pool}",
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv=argv)
    return 0
