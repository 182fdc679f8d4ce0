"""``cutout worker``'s defaults: pool size, threads, and which GPU each pool process gets."""
from __future__ import annotations

import os
import sys
import types

import pytest

from cutout.workers.cli_worker import worker_plan


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "CUTOUT_THREADS", "OMP_NUM_THREADS", "CUTOUT_DEVICE"):
        monkeypatch.delenv(name, raising=False)


def test_one_process_per_gpu_by_default_with_the_cores_split():
    plan = worker_plan(None, cpu_count=16, gpu_count=4)
    assert plan["CUTOUT_CONCURRENCY"] == "4"
    assert plan["CUTOUT_WORKER_GPUS"] == "0,1,2,3"
    assert plan["CUTOUT_THREADS"] == plan["OMP_NUM_THREADS"] == "4"
    assert "CUTOUT_DEVICE" not in plan


def test_several_processes_per_gpu_share_the_cores():
    plan = worker_plan(None, cpu_count=16, gpu_count=2, processes_per_gpu=4)
    assert plan["CUTOUT_CONCURRENCY"] == "8" and plan["CUTOUT_WORKER_GPUS"] == "0,1"
    assert plan["CUTOUT_THREADS"] == "2"


def test_visible_devices_are_the_gpus_to_pin(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert worker_plan(None, cpu_count=8, gpu_count=2)["CUTOUT_WORKER_GPUS"] == "2,5"


def test_cpu_only_machine_runs_one_process_per_two_cores_on_the_cpu():
    plan = worker_plan(None, cpu_count=8, gpu_count=0)
    assert plan["CUTOUT_CONCURRENCY"] == "4" and plan["CUTOUT_THREADS"] == "2"
    assert plan["CUTOUT_DEVICE"] == "cpu" and "CUTOUT_WORKER_GPUS" not in plan
    assert worker_plan(None, cpu_count=1, gpu_count=0)["CUTOUT_CONCURRENCY"] == "1"


def test_explicit_concurrency_wins():
    assert worker_plan(3, cpu_count=16, gpu_count=4, processes_per_gpu=2)["CUTOUT_CONCURRENCY"] == "3"


def test_pool_processes_are_pinned_to_gpus_round_robin(monkeypatch):
    from cutout.workers.celery_app import _pin_gpu

    monkeypatch.setenv("CUTOUT_WORKER_GPUS", "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # so the pins below are undone after the test
    pinned = []
    for index in range(5):
        process = types.SimpleNamespace(index=index)
        monkeypatch.setitem(sys.modules, "billiard.process",
                            types.SimpleNamespace(current_process=lambda process=process: process))
        _pin_gpu()
        pinned.append(os.environ["CUDA_VISIBLE_DEVICES"])
    assert pinned == ["0", "1", "0", "1", "0"]


def test_metrics_port_and_task_events_come_from_flags_or_the_environment(monkeypatch):
    from cutout.jobs.cli import build_parser

    monkeypatch.delenv("CUTOUT_METRICS_PORT", raising=False)
    monkeypatch.delenv("CUTOUT_TASK_EVENTS", raising=False)
    args = build_parser().parse_args(["worker"])
    assert args.metrics_port == 9108 and args.task_events is False
    monkeypatch.setenv("CUTOUT_METRICS_PORT", "0")
    monkeypatch.setenv("CUTOUT_TASK_EVENTS", "1")
    args = build_parser().parse_args(["worker"])
    assert args.metrics_port == 0 and args.task_events is True
    args = build_parser().parse_args(["worker", "--metrics-port", "9200"])
    assert args.metrics_port == 9200


def test_the_dependency_check_names_the_missing_module(monkeypatch, tmp_path):
    from cutout.workers.cli_worker import missing_worker_dependency

    assert missing_worker_dependency() is None  # this venv has the [worker] extra
    (tmp_path / "cv2.py").write_text("raise ImportError('cv2 shim')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert "cv2 shim" in missing_worker_dependency()
