"""Session-wide real services: redis-server, a moto S3 server and an S3 fault proxy.

Nothing is mocked: each service is a real process (or, for the fault proxy, a real HTTP
server on a thread of this process) on a free loopback port, started once per session.
The environment they need (AWS_ENDPOINT_URL, fake credentials, fast storage retries) is
exported into ``os.environ``, so subprocesses started by tests (Celery workers, the CLI)
inherit it.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # so `from tests.services import ...` works everywhere
    sys.path.insert(0, str(REPO_ROOT))

from tests.faultproxy import FaultProxy  # noqa: E402
from tests.services import FAST_RETRY_ENV, S3_TEST_ENV, MotoS3Server, RedisServer  # noqa: E402

# Defaults set at import, before any test module imports pymatting or the evaluator.
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO_ROOT / ".cache" / "numba"))
os.environ.setdefault("CUTOUT_EVAL_DATA", str(REPO_ROOT.parent / "shared" / "testdata"))
# Fake AWS credentials always: a test must never be able to reach a real account.
os.environ.update(S3_TEST_ENV)
for _name, _value in FAST_RETRY_ENV.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server for the session; fails (never skips) when it is not installed."""
    server = RedisServer()
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    os.environ["CUTOUT_REDIS_URL"] = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_server):
    """A client on a flushed database: each test starts from an empty Redis."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server for the session; AWS_ENDPOINT_URL points at it from now on."""
    server = MotoS3Server()
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"moto S3 server did not start (pip install 'moto[server]'): {exc}", pytrace=False)
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    yield server
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    return s3_server.endpoint


@pytest.fixture
def bucket(s3_server):
    """Factory: ``bucket()`` creates a fresh, empty bucket and returns its name."""
    from cutout.jobs.storage import s3_client

    def make(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        s3_client().create_bucket(Bucket=name)
        return name

    return make


@pytest.fixture(scope="session")
def _fault_proxy_server(s3_server):
    proxy = FaultProxy(upstream=s3_server.endpoint).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_fault_proxy(_fault_proxy_server, monkeypatch):
    """The fault proxy in front of moto, with AWS_ENDPOINT_URL pointing at it for this test.

    Faults are switched by method calls (``fail_next``, ``fail_for``); worker subprocesses
    started during the test inherit the endpoint and so go through the proxy too.
    """
    proxy = _fault_proxy_server
    proxy.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.reset()
