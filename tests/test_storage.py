"""cutout.jobs.storage against real backends: local files, moto's S3 server (through a fault proxy
when faults are needed) and a local HTTP server."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cutout.jobs import storage
from cutout.jobs.errors import InputTooLargeError, NotFoundError, StorageError, TransientStorageError


@pytest.fixture(params=["path", "file-uri", "s3"])
def root(request, tmp_path):
    """A writable prefix on each backend."""
    if request.param == "path":
        return str(tmp_path / "root")
    if request.param == "file-uri":
        return "file://" + str(tmp_path / "root")
    name = request.getfixturevalue("bucket")()
    return f"s3://{name}/root"


def test_round_trip_and_overwrite(root):
    uri = storage.join_uri(root, "deep/er/a.bin")
    storage.write_bytes(uri, b"first")
    assert storage.read_bytes(uri) == b"first"
    storage.write_bytes(uri, b"second, longer")
    assert storage.read_bytes(uri) == b"second, longer"
    assert storage.exists(uri)


def test_missing_object_is_not_found(root):
    uri = storage.join_uri(root, "nope.bin")
    with pytest.raises(NotFoundError):
        storage.read_bytes(uri)
    assert not storage.exists(uri)


def test_open_stream_reads_front_to_back_in_pieces(root):
    uri = storage.join_uri(root, "big/doc.json")
    data = bytes(range(256)) * 4099
    storage.write_bytes(uri, data)
    with storage.open_stream(uri) as stream:
        pieces = list(iter(lambda: stream.read(65536), b""))
    assert b"".join(pieces) == data and max(map(len, pieces)) <= 65536 and len(pieces) > 10
    with pytest.raises(NotFoundError):
        with storage.open_stream(storage.join_uri(root, "nope.json")):
            pass


def test_open_stream_over_http(http_base):
    with storage.open_stream(http_base + "/ok.jpg") as stream:
        assert stream.read(5) + stream.read() == b"image bytes"
    with pytest.raises(NotFoundError):
        with storage.open_stream(http_base + "/missing.jpg"):
            pass


def test_delete_is_idempotent(root):
    uri = storage.join_uri(root, "x.bin")
    storage.write_bytes(uri, b"x")
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # again: no error


def test_list_is_recursive_and_in_key_order(root):
    names = ["b.txt", "a/x.txt", "a-b/y.txt", "a.txt", "a/sub/z.txt", "c/d/e/f.txt"]
    for name in names:
        storage.write_bytes(storage.join_uri(root, name), name.encode())
    listed = list(storage.list_uris(root + "/"))
    assert listed == [storage.join_uri(root, n) for n in sorted(names)]
    assert list(storage.list_uris(storage.join_uri(root, "missing") + "/")) == []


def test_max_bytes_cap(root):
    uri = storage.join_uri(root, "big.bin")
    storage.write_bytes(uri, b"0123456789")
    assert storage.read_bytes(uri, max_bytes=10) == b"0123456789"
    with pytest.raises(InputTooLargeError):
        storage.read_bytes(uri, max_bytes=9)


def test_join_uri():
    assert storage.join_uri("s3://b/out/", "a", "/x.png") == "s3://b/out/a/x.png"
    assert storage.join_uri("s3://b", "k") == "s3://b/k"
    assert storage.join_uri("/data", "", "a/") == "/data/a"
    assert storage.join_uri("file:///data/", "a") == "file:///data/a"


def test_unsupported_scheme_is_refused():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.read_bytes("gs://bucket/key")


# --- atomic local writes ------------------------------------------------------------------------
def test_local_readers_never_see_a_partial_write(tmp_path):
    path = str(tmp_path / "out" / "big.bin")
    old, new = b"a" * (8 << 20), b"b" * (8 << 20)
    storage.write_bytes(path, old)
    stop = threading.Event()

    def writer():
        flip = True
        while not stop.is_set():
            storage.write_bytes(path, new if flip else old)
            flip = not flip

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(100):
            data = storage.read_bytes(path)
            assert data in (old, new), f"partial content of {len(data)} bytes"
    finally:
        stop.set()
        thread.join()
    assert os.listdir(tmp_path / "out") == ["big.bin"]  # no temp files left behind


def test_failed_local_write_keeps_old_content_and_cleans_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    storage.write_bytes(str(path), b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes(str(path), b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_upload_file_local_and_s3(tmp_path, bucket):
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(1000))
    for target in (str(tmp_path / "copy" / "dst.bin"), f"s3://{bucket()}/dst.bin"):
        storage.upload_file(str(source), target)
        assert storage.read_bytes(target) == source.read_bytes()


# --- S3 specifics -------------------------------------------------------------------------------
def test_s3_multipart_above_threshold(bucket, monkeypatch):
    monkeypatch.setenv("CUTOUT_S3_MULTIPART_THRESHOLD", str(5 << 20))
    name = bucket()
    data = os.urandom((11 << 20) + 123)
    storage.write_bytes(f"s3://{name}/big.bin", data)
    etag = storage.s3_client().head_object(Bucket=name, Key="big.bin")["ETag"].strip('"')
    assert etag.endswith("-3"), f"expected a 3-part multipart upload, ETag {etag}"
    assert storage.read_bytes(f"s3://{name}/big.bin") == data
    storage.write_bytes(f"s3://{name}/small.bin", data[: 1 << 20])
    small_etag = storage.s3_client().head_object(Bucket=name, Key="small.bin")["ETag"]
    assert "-" not in small_etag


def test_s3_missing_bucket_is_not_found(s3_server):
    with pytest.raises(NotFoundError):
        storage.read_bytes("s3://no-such-bucket-cutout/x")


def test_s3_retries_transient_errors_then_succeeds(bucket, s3_fault_proxy):
    name = bucket()
    s3_fault_proxy.fail_next(3)
    storage.write_bytes(f"s3://{name}/k", b"payload")
    assert s3_fault_proxy.requests_failed == 3
    s3_fault_proxy.fail_next(3)
    assert storage.read_bytes(f"s3://{name}/k") == b"payload"
    assert s3_fault_proxy.requests_failed == 6


def test_s3_gives_up_after_the_attempt_cap(bucket, s3_fault_proxy, monkeypatch):
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "4")
    name = bucket()
    s3_fault_proxy.fail_for(300)
    with pytest.raises(TransientStorageError, match="gave up after 4 attempt"):
        storage.read_bytes(f"s3://{name}/k")
    assert s3_fault_proxy.requests_failed == 4


def test_s3_gives_up_after_the_time_cap(bucket, s3_fault_proxy, monkeypatch):
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "1000")
    monkeypatch.setenv("CUTOUT_STORAGE_RETRY_MAX_S", "0.3")
    monkeypatch.setenv("CUTOUT_STORAGE_BACKOFF_S", "0.05")
    name = bucket()
    s3_fault_proxy.fail_for(300)
    with pytest.raises(TransientStorageError):
        storage.write_bytes(f"s3://{name}/k", b"x")
    assert 1 < s3_fault_proxy.requests_failed < 1000


def test_s3_multipart_survives_failed_part_uploads(bucket, s3_fault_proxy, monkeypatch):
    monkeypatch.setenv("CUTOUT_S3_MULTIPART_THRESHOLD", str(5 << 20))
    name = bucket()
    data = os.urandom(11 << 20)
    s3_fault_proxy.fail_next(2, methods=["PUT"])
    storage.write_bytes(f"s3://{name}/big.bin", data)
    assert s3_fault_proxy.requests_failed == 2
    assert storage.read_bytes(f"s3://{name}/big.bin") == data


def test_s3_listing_is_lazy(bucket, s3_fault_proxy):
    name = bucket()
    client = storage.s3_client()
    for i in range(1005):
        client.put_object(Bucket=name, Key=f"p/{i:05d}", Body=b"")
    before = s3_fault_proxy.requests_seen
    listing = storage.list_uris(f"s3://{name}/p/")
    first = next(listing)
    assert first == f"s3://{name}/p/00000"
    assert s3_fault_proxy.requests_seen - before == 1  # one page, not the whole prefix
    rest = list(listing)
    assert len(rest) == 1004 and rest[-1] == f"s3://{name}/p/01004"
    assert s3_fault_proxy.requests_seen - before == 2


def _child_reads(uri, queue):
    try:
        data = storage.read_bytes(uri)
        queue.put((data, sorted({key[0] for key in storage._CLIENTS}), os.getpid()))
    except Exception as exc:  # report to the parent instead of dying silently
        queue.put((repr(exc), [], os.getpid()))


def test_s3_client_is_recreated_after_fork(bucket):
    name = bucket()
    storage.write_bytes(f"s3://{name}/k", b"from parent")
    parent_client = storage.s3_client()
    assert parent_client is storage.s3_client()  # one client per process
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(f"s3://{name}/k", queue))
    child.start()
    data, pids, child_pid = queue.get(timeout=60)
    child.join(timeout=60)
    assert data == b"from parent"
    assert pids == [child_pid]  # the child dropped the parent's client and made its own


# --- HTTP(S) ------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args):
        return

    def do_GET(self):
        _Handler.hits[self.path] = _Handler.hits.get(self.path, 0) + 1
        if self.path == "/ok.jpg":
            self._send(200, b"image bytes")
        elif self.path == "/flaky":
            self._send(503, b"busy") if _Handler.hits[self.path] <= 2 else self._send(200, b"finally")
        elif self.path == "/down":
            self._send(500, b"down")
        elif self.path == "/forbidden":
            self._send(403, b"no")
        elif self.path == "/big":
            self._send(200, b"x" * 5000)
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"12345")
            self.wfile.flush()
            time.sleep(2)
            self.wfile.write(b"67890")
        else:
            self._send(404, b"not here")

    def _send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_read(http_base):
    assert storage.read_bytes(http_base + "/ok.jpg") == b"image bytes"
    assert storage.exists(http_base + "/ok.jpg")
    assert not storage.exists(http_base + "/missing.jpg")


def test_http_404_is_not_found(http_base):
    with pytest.raises(NotFoundError):
        storage.read_bytes(http_base + "/missing.jpg")


def test_http_5xx_is_retried(http_base):
    assert storage.read_bytes(http_base + "/flaky") == b"finally"
    assert _Handler.hits["/flaky"] == 3


def test_http_5xx_forever_gives_up(http_base, monkeypatch):
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "3")
    with pytest.raises(TransientStorageError, match="HTTP 500"):
        storage.read_bytes(http_base + "/down")
    assert _Handler.hits["/down"] == 3


def test_http_4xx_is_permanent(http_base):
    with pytest.raises(StorageError) as info:
        storage.read_bytes(http_base + "/forbidden")
    assert not isinstance(info.value, TransientStorageError)
    assert _Handler.hits["/forbidden"] == 1


def test_http_size_cap(http_base):
    with pytest.raises(InputTooLargeError):  # refused from Content-Length
        storage.read_bytes(http_base + "/big", max_bytes=4000)
    with pytest.raises(InputTooLargeError):  # no Content-Length: stopped while reading
        storage.read_bytes(http_base + "/big-unannounced", max_bytes=4000)
    assert len(storage.read_bytes(http_base + "/big-unannounced", max_bytes=5000)) == 5000


def test_http_read_timeout(http_base, monkeypatch):
    monkeypatch.setenv("CUTOUT_STORAGE_READ_TIMEOUT", "0.3")
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "1")
    with pytest.raises(TransientStorageError, match="timed out"):
        storage.read_bytes(http_base + "/slow")


def test_http_is_read_only(http_base):
    with pytest.raises(StorageError, match="read-only"):
        storage.write_bytes(http_base + "/x", b"")


def test_fault_proxy_as_a_subprocess_with_a_control_file(bucket, s3_server, tmp_path, monkeypatch):
    """The proxy's subprocess mode (for faults that must outlive or sit outside this process)."""
    import subprocess
    import sys

    from tests.services import free_port, wait_until

    name = bucket()
    storage.write_bytes(f"s3://{name}/k", b"payload")
    control, port = tmp_path / "control.json", free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.faultproxy", "--upstream", s3_server.endpoint,
         "--port", str(port), "--control", str(control)],
        cwd=str(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        import socket

        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True,
                   timeout=15, what="fault proxy", process=proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "2")
        control.write_text('{"fail_next": 2, "methods": ["GET"]}')
        with pytest.raises(TransientStorageError, match="SlowDown"):
            storage.read_bytes(f"s3://{name}/k")
        assert storage.read_bytes(f"s3://{name}/k") == b"payload"  # the two failures are used up
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
