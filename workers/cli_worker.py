"""``cutout worker``: start a Celery worker with sane defaults for this machine.

One pool process per GPU when GPUs are present (each pinned to its own GPU, round robin), or
``--processes-per-gpu N`` of them: the CPU stages after the model (refine, matte, foreground,
encode: about 0.25 s per 800-px photo on one core, docs/results.md) take far longer than a
GPU's model pass, so several processes per GPU keep it busy. Without GPUs, about one process
per two CPU cores, with torch's threads split between them. Importing this module
is cheap: torch is never imported here. The worker refuses to start without the [worker]
extra (exit status 2, a usage error, before it connects anywhere) and serves Prometheus metrics on
``--metrics-port`` (cutout.workers.telemetry).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from cutout.jobs.cli import WORKER_EXTRA_HINT, add_connection_args
from cutout.jobs.settings import redact_url, settings

# `cutout worker` exits with this when the [worker] extra is missing (documented in the README).
EXIT_MISSING_DEPENDENCIES = 2  # the CLI's usage/configuration code (README, "Exit codes")
# Imported in a child interpreter so this process stays free of torch until its pool forks;
# pymatting is only located, since importing it compiles numba kernels (about 70 s cold).
_DEPENDENCY_CHECK = """
import importlib, importlib.util
for name in ("torch", "torchvision", "cv2", "onnx", "onnxruntime", "prometheus_client"):
    importlib.import_module(name)
if importlib.util.find_spec("pymatting") is None:
    raise ModuleNotFoundError("No module named 'pymatting'", name="pymatting")
"""


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
    parser.add_argument("--metrics-port", type=int,
                        default=settings().metrics_port,
                        help="Prometheus /metrics port; 0 turns it off (default: %(default)s)")
    parser.add_argument("--task-events", "-E", action="store_true",
                        default=settings().task_events,
                        help="send Celery task events (for Flower)")
    add_connection_args(parser)
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


def missing_worker_dependency() -> str | None:
    """The first of the worker's modules that cannot be imported, or None when all can.

    Checked before the worker connects: a worker without them would take a shard and fail it.
    """
    check = subprocess.run([sys.executable, "-c", _DEPENDENCY_CHECK], capture_output=True, text=True)
    if check.returncode == 0:
        return None
    lines = [line for line in check.stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else f"exit status {check.returncode}"


def prepare_metrics_store() -> str | None:
    """prometheus_client's multiprocess store, emptied: every pool process (and a solo worker's
    one) counts into it and the main process serves the sum (see cutout.workers.telemetry).
    Returns the folder when it was made here (removed when the worker stops)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made = None if path else tempfile.mkdtemp(prefix="cutout-metrics-")
    path = path or made
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):  # only prometheus_client's own files: counts of an earlier run
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return made


BROKER_POLL_S = 2.0


def wait_for_broker(url: str) -> None:
    """Return once the broker answers PING, saying once (one line) that we wait for it.

    A fleet starts in any order, so a worker up before its Redis waits rather than exits;
    Celery's own wait prints its banner and a "Trying again (1/100)" line per attempt, and
    gives up after 100. Wrong credentials are not waited out: that error reaches the CLI.
    """
    import redis

    said = False
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
            return
        except redis.exceptions.AuthenticationError:
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            if not said:
                print(f"cutout worker: waiting for the broker at {redact_url(url)} "
                      "(not answering yet; the worker starts when it does, Ctrl-C stops)",
                      file=sys.stderr, flush=True)
                said = True
        time.sleep(BROKER_POLL_S)


def run_worker(args: argparse.Namespace) -> int:
    missing = missing_worker_dependency()
    if missing:
        print(f"cutout: error: the worker cannot start ({missing}): {WORKER_EXTRA_HINT}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCIES
    plan = worker_plan(args.concurrency, os.cpu_count() or 1, count_gpus(), args.processes_per_gpu)
    os.environ.update(plan)
    # The resolved URLs, for the Celery app and every pool process (progress, heartbeats).
    os.environ.update(CUTOUT_BROKER_URL=args.broker, CUTOUT_REDIS_URL=args.redis)
    wait_for_broker(args.broker)
    if args.max_tasks_per_child:
        os.environ["CUTOUT_MAX_TASKS_PER_CHILD"] = str(args.max_tasks_per_child)
    made_store = prepare_metrics_store() if args.metrics_port else None  # before prometheus_client loads
    from cutout.jobs.queue import broker_url
    from cutout.workers import telemetry
    from cutout.workers.celery_app import app

    if args.metrics_port:
        telemetry.start_exporter(args.metrics_port, broker_url=broker_url(),
                                 queues=[q for q in args.queues.split(",") if q],
                                 processes=int(plan["CUTOUT_CONCURRENCY"]))

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
    if args.task_events:
        argv.append("--task-events")
    try:
        app.worker_main(argv=argv)
    finally:
        if made_store:
            shutil.rmtree(made_store, ignore_errors=True)
    return 0
