"""The edges a new user hits, each through the real ``cutout`` command in a subprocess.

One Redis URL drives the broker and the live progress (two real redis-servers show which one
got the keys); ``submit`` says when workers would refuse its local inputs; usage mistakes are
one line with a documented exit code, before any model loads; a worker started before its
Redis waits for it in one line; progress written to a file is plain lines.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import images
from tests.services import LOCAL_TEST_SOURCES, RedisServer, free_port
from tests.test_cli_errors import REPO_ROOT, assert_one_line, cutout_cli
from tests.test_submit import write_inputs

# No URL from the session's environment: each test says which Redis it means.
NO_URLS = {"CUTOUT_BROKER_URL": "", "CUTOUT_REDIS_URL": ""}


@pytest.fixture
def inputs(tmp_path) -> Path:
    write_inputs(tmp_path / "in", 3, {})
    return tmp_path / "in"


@pytest.fixture
def two_redis():
    """Two real redis-servers: ``default`` stands in for the default local Redis."""
    with RedisServer() as default, RedisServer() as chosen:
        yield default, chosen


def _job_keys(server: RedisServer) -> list[bytes]:
    return [key for key in server.client().keys("cutout:*")]


# --- one Redis URL ---------------------------------------------------------------------------------
def test_broker_alone_moves_the_live_progress_too(inputs, tmp_path, two_redis):
    default, chosen = two_redis
    env = {**NO_URLS, **LOCAL_TEST_SOURCES, "CUTOUT_BROKER_URL": default.url}
    queue = f"edges-{uuid.uuid4().hex[:6]}"
    result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"), "--model", "threshold",
                        "--queue", queue, "--broker", chosen.url, env=env)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip()
    assert chosen.client().llen(queue) > 0  # queued on the chosen broker
    assert _job_keys(chosen) and not _job_keys(default)  # and its progress beside it
    status = cutout_cli("status", job, "--broker", chosen.url, env=env)
    assert status.returncode == 4, status.stderr  # found, not finished (no worker)
    assert "0/3 inputs" in status.stdout
    cancel = cutout_cli("cancel", job, "--broker", chosen.url, env=env)
    assert cancel.returncode == 0, cancel.stderr
    assert not _job_keys(default)


def test_submit_job_from_python_with_only_a_broker_keeps_progress_beside_it(inputs, tmp_path, two_redis,
                                                                          monkeypatch):
    """The Python functions follow the CLI's rule: naming only a broker moves progress too."""
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import cancel_job, find_job, resume_job, submit_job

    default, chosen = two_redis
    monkeypatch.setenv("CUTOUT_BROKER_URL", default.url)
    monkeypatch.setenv("CUTOUT_REDIS_URL", "")
    spec = JobSpec(sources=(str(inputs),), destination=(tmp_path / "out").as_uri(),
                   pipeline=PipelineOptions(model="threshold"), queue=f"edges-{uuid.uuid4().hex[:6]}")
    submit_job(spec, broker_url=chosen.url)
    assert _job_keys(chosen) and not _job_keys(default)
    resume_job(spec.job_id, broker_url=chosen.url)
    assert find_job(spec.job_id, redis_url=chosen.url).job_id == spec.job_id
    cancel_job(spec.job_id, redis_url=chosen.url)
    assert not _job_keys(default)


def test_redis_flag_or_variable_still_separates_progress(inputs, tmp_path, two_redis):
    progress, broker = two_redis
    for extra, env in ((("--redis", progress.url), {}), ((), {"CUTOUT_REDIS_URL": progress.url})):
        progress.client().flushall()
        broker.client().flushall()
        result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"), "--model", "threshold",
                            "--broker", broker.url, *extra, env={**NO_URLS, **LOCAL_TEST_SOURCES, **env})
        assert result.returncode == 0, result.stderr
        assert _job_keys(progress) and not _job_keys(broker)


@pytest.mark.parametrize("url", ["redis:/host", "redis://127.0.0.1:6379/x", "redis://host:notaport/0"])
@pytest.mark.parametrize("command", [("status", "0123456789abcdef"), ("cancel", "0123456789abcdef"),
                                     ("report", "0123456789abcdef")])
def test_malformed_broker_url_is_a_usage_error_for_every_command(command, url):
    assert_one_line(cutout_cli(*command, "--broker", url, env=NO_URLS), 2, "broker", "--broker")


# --- local sources and the workers' allowlist --------------------------------------------------------
def test_submit_of_a_local_folder_warns_once_and_still_submits(inputs, tmp_path, redis_url, redis_client):
    env = {**NO_URLS, "CUTOUT_ALLOWED_SOURCES": ""}  # the workers' documented default
    result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"), "--model", "threshold",
                        "--broker", redis_url, env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("cutout: warning:")]
    assert len(warnings) == 1, result.stderr
    assert "SourceNotAllowedError" in warnings[0] and f"file://{inputs.resolve()}/" in warnings[0]
    assert len(result.stdout.split()) == 1  # the job id: submitted anyway


def test_local_paths_in_a_list_file_warn_too_and_an_allowed_folder_does_not(inputs, tmp_path, redis_url):
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p.as_uri()}\n" for p in sorted(inputs.rglob("*.png"))))
    warned = cutout_cli("submit", str(listing), "--to", str(tmp_path / "out"), "--model", "threshold",
                        "--broker", redis_url, env={**NO_URLS, "CUTOUT_ALLOWED_SOURCES": ""})
    assert warned.returncode == 0 and warned.stderr.count("cutout: warning:") == 1, warned.stderr
    allowed = cutout_cli("submit", str(listing), "--to", str(tmp_path / "out"), "--model", "threshold",
                         "--broker", redis_url, env={**NO_URLS, "CUTOUT_ALLOWED_SOURCES": inputs.as_uri() + "/"})
    assert allowed.returncode == 0 and "warning" not in allowed.stderr, allowed.stderr


# --- usage mistakes: one line, exit 2, before any model loads --------------------------------------------
def _no_model_loaded(result) -> None:
    assert "loaded in" not in result.stderr, result.stderr


def test_out_that_cannot_be_a_folder(inputs, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, words in (("/proc/x", ("/proc/x", "cannot be made a folder")),
                       (str(a_file), ("is a file",)),
                       (str(a_file / "sub"), ("a_file is a file",))):
        result = cutout_cli("run", str(inputs), "--out", out, "--model", "threshold")
        assert_one_line(result, 2, "--out", *words)
        _no_model_loaded(result)
    assert a_file.read_text() == "x"


def test_missing_trimaps_folder_is_an_error_and_nothing_is_written(inputs, tmp_path):
    result = cutout_cli("run", str(inputs), "--out", str(tmp_path / "out"), "--model", "threshold",
                        "--trimaps", str(tmp_path / "nodir"))
    assert_one_line(result, 2, "--trimaps", "no such folder")
    assert not (tmp_path / "out").exists()


def test_eval_data_that_eval_cannot_read(tmp_path):
    (tmp_path / "only_images" / "image").mkdir(parents=True)
    (tmp_path / "only_images" / "image" / "a.png").write_bytes(images.png_rgb_bytes())
    for data, words in ((tmp_path / "nope", ("no such folder",)),
                        (tmp_path / "only_images", ("alpha/", "mask/"))):
        result = cutout_cli("eval", "--data", str(data), "--model", "threshold", "--out", str(tmp_path / "ev"))
        assert_one_line(result, 2, "--data", *words)
        _no_model_loaded(result)


def test_argparse_mistakes_are_one_line_with_a_help_hint():
    for argv in (("run", "--bogus"), ("submit", "x", "--shard-size", "many"), ("nope",), ("submit", "x")):
        result = cutout_cli(*argv)
        line = assert_one_line(result, 2, "--help")
        assert "usage:" not in result.stderr, line


def test_a_108_megapixel_png_points_at_max_pixels(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(images.giant_png_header(width=12000, height=9000))
    result = cutout_cli("run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", "threshold")
    assert result.returncode == 3, result.stderr
    failure = [line for line in result.stderr.splitlines() if line.startswith("failed:")]
    assert len(failure) == 1 and "ImageTooLargeError" in failure[0], result.stderr
    assert "--max-pixels" in failure[0] and "108,000,000" in failure[0]
    assert "DOS attack" not in result.stderr + result.stdout


# --- a worker started before its Redis -------------------------------------------------------------
def test_worker_waits_for_its_broker_in_one_line_then_serves_the_job(inputs, tmp_path):
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    queue = f"edges-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **NO_URLS, **LOCAL_TEST_SOURCES, "CUTOUT_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cutout.jobs.cli", "worker", "--pool", "solo", "--queues", queue,
             "--metrics-port", "0", "--broker", broker],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "waiting for the broker" in log_path.read_text(), worker, log_path)
        time.sleep(5)  # a few polls later: still the one line, no Celery retry noise
        lines = log_path.read_text().strip().splitlines()
        assert len(lines) == 1, lines
        assert broker in lines[0]
        server = RedisServer(port=port)
        server.start()
        try:
            result = cutout_cli("submit", str(inputs), "--to", str(tmp_path / "out"), "--model", "threshold",
                                "--matting", "none", "--queue", queue, "--broker", broker,
                                env={**NO_URLS, **LOCAL_TEST_SOURCES})
            assert result.returncode == 0, result.stderr
            job = result.stdout.strip()
            done = lambda: cutout_cli("status", job, "--broker", broker, env=NO_URLS).returncode == 0  # noqa: E731
            _wait_for(done, worker, log_path, timeout=240)
            assert "Trying again" not in log_path.read_text()
            watch = cutout_cli("status", job, "--watch", "--interval", "0.2", "--broker", broker, env=NO_URLS)
            assert watch.returncode == 0, watch.stderr
            assert "\r" not in watch.stderr and f"{job}: 3/3 inputs (100.0 %)" in watch.stderr
        finally:
            server.stop()
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)


def _wait_for(check, worker, log_path: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert worker.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)


# --- progress in a log file ------------------------------------------------------------------------
def test_run_into_a_log_file_writes_lines_not_bar_frames(inputs, tmp_path):
    result = cutout_cli("run", str(inputs), "--out", str(tmp_path / "out"), "--model", "threshold",
                        "--matting", "none")
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "3/3 inputs (100.0 %)" in result.stderr
