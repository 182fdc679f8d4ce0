"""Errors in one line, checked before anything is written, with the README's exit codes.

Each test runs the real ``cutout`` command in a subprocess. An absent Redis is a free port with
nothing listening; a real redis-server (tests/services.py) backs the job exit codes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cutout
from tests.services import free_port, interruptible
from tests.test_submit import run_all_shards, write_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-pw"


def cutout_cli(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutout.jobs.cli", *argv], cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cutout: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def inputs(tmp_path) -> Path:
    write_inputs(tmp_path / "in", 2, {})
    return tmp_path / "in"


def test_unreachable_broker_is_one_line_exit_5_no_secret_nothing_written(inputs, tmp_path):
    dead = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"), "--broker", dead, "--redis", dead)
    line = assert_one_line(result, 5, "unreachable", "redis-server")
    assert SECRET not in result.stderr + result.stdout and "127.0.0.1" in line
    assert not (tmp_path / "out").exists()


def test_unreachable_broker_from_the_environment(inputs, tmp_path):
    dead = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"),
                        env={"CUTOUT_BROKER_URL": dead, "CUTOUT_REDIS_URL": ""})
    assert_one_line(result, 5, "CUTOUT_BROKER_URL")
    assert SECRET not in result.stderr and not (tmp_path / "out").exists()


def test_wrong_broker_scheme_is_a_usage_error(inputs, tmp_path):
    result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"),
                        "--broker", f"amqp://guest:{SECRET}@127.0.0.1:5672//")
    assert_one_line(result, 2, "needs Redis", "redis://")
    assert SECRET not in result.stderr and not (tmp_path / "out").exists()


def test_status_with_redis_down_is_exit_5():
    result = cutout_cli("status", "0123456789abcdef", "--redis", f"redis://:{SECRET}@127.0.0.1:{free_port()}/0")
    assert_one_line(result, 5, "cannot reach Redis")
    assert SECRET not in result.stderr


def test_debug_flag_and_variable_show_the_traceback():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for argv, env in ((("--debug", "status", "x", "--redis", dead), {}),
                      (("status", "x", "--redis", dead, "--debug"), {}),
                      (("status", "x", "--redis", dead), {"CUTOUT_DEBUG": "1"})):
        result = cutout_cli(*argv, env=env)
        assert result.returncode == 5 and "Traceback" in result.stderr, (argv, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("cutout: error: ")


def test_unknown_device_and_cuda_without_a_gpu(inputs, tmp_path):
    out = tmp_path / "out"
    assert_one_line(cutout_cli("run", str(inputs), "--out", str(out), "--device", "gpu"), 2,
                    "unknown device 'gpu'", "cpu, cuda or cuda:N")
    no_gpu = cutout_cli("run", str(inputs), "--out", str(out), "--device", "cuda:0",
                        env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_line(no_gpu, 2, "no CUDA GPU", "--device cpu")
    assert not out.exists()


def test_bad_device_in_the_environment_names_the_variable(inputs, tmp_path):
    result = cutout_cli("run", str(inputs), "--out", str(tmp_path / "out"), env={"CUTOUT_DEVICE": "tpu"})
    assert_one_line(result, 2, "CUTOUT_DEVICE='tpu'")


def test_unreadable_image_background_is_refused_before_any_work(inputs, tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    for background, words in ((f"image:{tmp_path / 'missing.jpg'}", ("cannot be read", "missing.jpg")),
                              (f"image:{not_an_image}", ("not an image",))):
        run = cutout_cli("run", str(inputs), "--out", str(tmp_path / "out"), "--background", background,
                         "--model", "threshold")
        assert_one_line(run, 2, *words)
        submit = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "dest"), "--background", background,
                            "--broker", f"redis://127.0.0.1:{free_port()}/0")
        assert_one_line(submit, 2, *words)  # the background is checked before the broker
    assert not (tmp_path / "out").exists() and not (tmp_path / "dest").exists()


def test_missing_weights_are_a_setup_error_naming_the_fetch_command(inputs, tmp_path):
    """The fast preset runs IS-Net and u2netp: with neither fetched, exit 2 and the command."""
    result = cutout_cli("run", str(inputs), "--out", str(tmp_path / "out"), "--preset", "fast",
                        env={"CUTOUT_MODELS_DIR": str(tmp_path / "no-models")})
    assert_one_line(result, 2, "not found", "run: cutout models fetch")


def test_missing_worker_extra_says_what_to_install(inputs, tmp_path):
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    result = cutout_cli("run", str(inputs), "--out", str(tmp_path / "out"), "--model", "threshold",
                        env={"PYTHONPATH": str(blocker.parent)})
    assert_one_line(result, 2, "pip install -e '.[worker]'", "'torch'")


def test_version():
    result = cutout_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cutout {cutout.__version__}"


def test_unexpected_error_is_one_line_exit_1():
    from cutout.jobs.cli import describe_error

    code, line = describe_error(RuntimeError(f"boom\nat redis://u:{SECRET}@h/0"))
    assert code == 1 and "\n" not in line and SECRET not in line and "--debug" in line


# --- job exit codes on a real redis-server ------------------------------------------------------
@pytest.fixture
def submitted(tmp_path, redis_client, redis_url):
    source = tmp_path / "in"
    write_inputs(source, 3, {"empty.png": b""})
    dest = tmp_path / "out"
    result = cutout_cli("submit", str(source), "--to", str(dest), "--model", "threshold", "--matting", "none",
                        "--shard-size", "2", "--broker", redis_url, "--redis", redis_url)
    assert result.returncode == 0, result.stderr
    return {"job": result.stdout.split()[0], "dest": dest, "redis": redis_url}


def test_status_and_report_exit_4_while_the_job_is_unfinished(submitted):
    status = cutout_cli("status", submitted["job"], "--redis", submitted["redis"])
    assert status.returncode == 4, status.stderr
    report = cutout_cli("report", submitted["job"], "--redis", submitted["redis"])
    assert report.returncode == 4 and "not finished" in report.stdout, report.stderr


def test_status_and_report_exit_3_when_finished_with_failed_inputs(submitted, redis_client, monkeypatch):
    from cutout.jobs.sharding import job_prefix

    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", "file:///")  # a worker that may read local inputs

    run_all_shards(job_prefix(submitted["dest"].as_uri(), submitted["job"]))  # as a worker would
    redis_client.flushall()  # live counts come from Celery workers; status rebuilds from the records
    status = cutout_cli("status", submitted["job"], "--dest", submitted["dest"].as_uri(),
                        "--redis", submitted["redis"])
    assert status.returncode == 3, (status.stdout, status.stderr)
    report = cutout_cli("report", submitted["job"], "--dest", submitted["dest"].as_uri())
    assert report.returncode == 3 and "EmptyInputError" in report.stdout, report.stderr


def test_ctrl_c_on_status_watch_is_one_line_exit_130(submitted):
    process = subprocess.Popen(
        [sys.executable, "-m", "cutout.jobs.cli", "status", submitted["job"], "--watch", "--interval", "0.2",
         "--redis", submitted["redis"]], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=interruptible)
    first = process.stderr.read(1)  # the progress bar is drawn: it is watching (no workers: forever)
    assert process.poll() is None, first + process.stderr.read()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "cutout: interrupted"
