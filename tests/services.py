"""Real local services for tests: a redis-server and a moto S3 server, each a subprocess.

Used by tests/conftest.py (session fixtures) and usable by hand::

    with RedisServer() as redis_srv, MotoS3Server() as s3:
        print(redis_srv.url, s3.endpoint)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

REDIS_INSTALL_HINT = (
    "redis-server was not found on PATH. The tests need a real Redis: install it with "
    "`sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS), "
    "or point CUTOUT_REDIS_SERVER at the binary."
)


def interruptible() -> None:
    """``preexec_fn`` for a child a test sends Ctrl-C: SIGINT back to its default. A runner
    started in the background (``cmd &`` in a script) ignores SIGINT, and an ignored signal
    is inherited, so without this the child would never see the Ctrl-C being tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, *, timeout: float, what: str, process: subprocess.Popen | None = None,
               log_path: str | None = None) -> None:
    """Poll ``check()`` until it is truthy; fail with the process log if it died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = Path(log_path).read_text(errors="replace")[-4000:] if log_path else ""
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready:\n{output}")
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet: poll again
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s")


class _Subprocess:
    """A server subprocess whose output goes to a log file (a pipe nobody reads would fill up
    and freeze the server after a few hundred logged requests)."""

    process: subprocess.Popen | None = None
    log_path: str | None = None

    def _spawn(self, argv: list[str], name: str, env: dict | None = None) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"cutout-{name}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.log_path:
            Path(self.log_path).unlink(missing_ok=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(_Subprocess):
    """``redis-server`` on a free loopback port, no persistence, its own working folder."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="cutout-redis-")

    def start(self) -> "RedisServer":
        binary = os.environ.get("CUTOUT_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise RuntimeError(REDIS_INSTALL_HINT)
        self._spawn(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no"],
            "redis",
        )
        wait_until(self.ping, timeout=15, what="redis-server", process=self.process, log_path=self.log_path)
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class MotoS3Server(_Subprocess):
    """moto's S3-compatible HTTP server (``python -m moto.server``) on a free loopback port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3Server":
        self._spawn(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            "moto", env={**os.environ, **S3_TEST_ENV},
        )
        wait_until(self.ready, timeout=30, what="moto S3 server", process=self.process, log_path=self.log_path)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1) as response:
                return response.status == 200
        except urllib.error.URLError:
            return False


# Fake credentials so nothing in a test run can ever reach a real AWS account.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}

# Storage retries fast in tests: backoff 20 ms, at most 5 attempts / 5 s per call.
# Workers read no local file unless its prefix is allowed (CUTOUT_ALLOWED_SOURCES); tests keep
# their inputs under the temporary folder.
LOCAL_TEST_SOURCES = {
    "CUTOUT_ALLOWED_SOURCES": f"s3://,http://,https://,{Path(tempfile.gettempdir()).resolve().as_uri()}/",
}

FAST_RETRY_ENV = {
    "CUTOUT_STORAGE_RETRIES": "5",
    "CUTOUT_STORAGE_RETRY_MAX_S": "5",
    "CUTOUT_STORAGE_BACKOFF_S": "0.02",
    "CUTOUT_STORAGE_READ_TIMEOUT": "10",  # moto's server now and then stalls one request
}
