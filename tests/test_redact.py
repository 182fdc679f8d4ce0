"""No secret in any message or log line: broker passwords, URL userinfo, presigned signatures,
access keys. Checked on the helper, on the real CLI's output and on a real worker's log."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cutout.jobs.redact import redact

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "Sup3rSecretPassw0rd"
JOB = "0123456789abcdef"


@pytest.mark.parametrize("text, kept", [
    (f"redis://:{SECRET}@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
    (f"rediss://cutout:{SECRET}@redis.internal:6380/1", "rediss://cutout:***@redis.internal:6380/1"),
    (f"see https://{SECRET}@github.com/x.jpg failed", "see https://***@github.com/x.jpg failed"),
    (f"https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F&X-Amz-Signature={SECRET}&v=1",
     "https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential=***&X-Amz-Signature=***&v=1"),
    (f"https://h/a.jpg?token={SECRET}", "https://h/a.jpg?token=***"),
    ("key AKIAABCDEFGHIJKLMNOP used", "key AKIA**************** used"),
    ("s3://bucket/photos/cat.jpg and http://host:8080/a.png stay", "s3://bucket/photos/cat.jpg and http://host:8080/a.png stay"),
])
def test_redact(text, kept):
    assert redact(text) == kept


def test_secret_environment_values_are_masked_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert redact("boto said wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY") == "boto said ***"


def test_typed_errors_never_carry_a_secret():
    from cutout.jobs.errors import TransientStorageError

    assert SECRET not in str(TransientStorageError(f"read https://u:{SECRET}@h/x.jpg: timed out"))


def test_log_records_are_redacted_once_installed(caplog):
    from cutout.jobs.redact import install_log_redaction

    install_log_redaction()
    logger = logging.getLogger("cutout.test.redact")
    with caplog.at_level(logging.INFO, logger="cutout.test.redact"):
        logger.info("connecting to %s", f"redis://:{SECRET}@h:1/0")
        try:
            raise RuntimeError(f"https://u:{SECRET}@h/x.jpg refused")
        except RuntimeError:
            logger.exception("read failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert "redis://:***@h:1/0" in text and "refused" in text
    assert SECRET not in text


# --- through the real CLI --------------------------------------------------------------------
@pytest.fixture
def password_url(redis_server, redis_client):
    """A Redis user with a password, on the session's redis-server (ACL), and its URL."""
    user = f"cutout-{uuid.uuid4().hex[:6]}"
    redis_client.execute_command("ACL", "SETUSER", user, "on", f">{SECRET}", "~*", "&*", "+@all")
    yield f"redis://{user}:{SECRET}@127.0.0.1:{redis_server.port}/0"
    redis_client.execute_command("ACL", "DELUSER", user)


@pytest.mark.parametrize("command", ["status", "report"])
@pytest.mark.parametrize("how", ["--redis", "env"])
def test_cli_never_prints_the_broker_password(password_url, command, how):
    env = {**os.environ, "CUTOUT_BROKER_URL": password_url, "CUTOUT_REDIS_URL": password_url}
    argv = [sys.executable, "-m", "cutout.jobs.cli", command, JOB]
    if how == "--redis":
        argv += ["--redis", password_url]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "not known to Redis" in done.stderr and ":***@127.0.0.1" in done.stderr, done.stderr
    assert SECRET not in done.stdout + done.stderr


# --- through a real worker ---------------------------------------------------------------------
def test_a_worker_log_never_shows_a_secret_and_a_forged_task_touches_nothing(redis_server, tmp_path):
    """A real `cutout worker`; two forged messages: a shard id that climbs out of the job (refused,
    nothing touched) and a job prefix on a host with a password in its URL (fails; the log
    shows the failure with the password masked)."""
    from cutout.jobs.queue import send_process_shard, submitter_app

    queue = f"forged-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "CUTOUT_BROKER_URL": redis_server.url, "CUTOUT_REDIS_URL": redis_server.url,
           "CUTOUT_TASK_MAX_RETRIES": "0", "PYTHONUNBUFFERED": "1", "CUTOUT_THREADS": "1",
           "OMP_NUM_THREADS": "1", "CUTOUT_ALLOW_PRIVATE_HOSTS": "1"}
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cutout.jobs.cli", "worker", "--pool", "solo", "--concurrency", "1",
             "--queues", queue, "--hostname", f"{queue}@%h", "--loglevel", "INFO"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: " ready." in log_path.read_text(errors="replace"), worker, log_path, 90)
        dest = tmp_path / "out"
        app = submitter_app(redis_server.url)
        send_process_shard(app, f"{dest.as_uri()}/_cutout/jobs/{JOB}", "../../../../../escape", queue=queue)
        send_process_shard(app, f"http://cutout:{SECRET}@127.0.0.1:9/_cutout/jobs/{JOB}", "s000000", queue=queue)
        _wait_for(lambda: log_path.read_text(errors="replace").count("cutout.process_shard[") >= 4,
                  worker, log_path, 60)
        time.sleep(1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    text = log_path.read_text(errors="replace")
    assert "InvalidIdError" in text, text[-3000:]
    assert "http://cutout:***@127.0.0.1:9/" in text, text[-3000:]
    assert SECRET not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker.log"]  # nothing written for the job


def _wait_for(check, proc, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            pytest.fail(f"worker exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out:\n{log_path.read_text(errors='replace')[-3000:]}")
