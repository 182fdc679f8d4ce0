"""cutout.jobs.storage against hostile inputs: a trickling HTTP server, named pipes and devices,
symlink loops and unreadable folders, sources outside the worker's allowlist, redirects to
private addresses. Every case must end in a typed error (or a skipped, counted entry), fast."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from cutout.jobs import storage
from cutout.jobs.errors import StorageError, TransientStorageError


# --- a server that trickles one byte at a time -------------------------------------------------
class TrickleServer:
    """Answers every request one byte every ``interval`` seconds, for up to ``limit_s``:
    the status line and headers (``mode="headers"``) or, after prompt headers, the body."""

    def __init__(self, mode: str, interval: float = 0.25, limit_s: float = 40.0):
        self.mode, self.interval, self.limit_s = mode, interval, limit_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow.jpg"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"
            if self.mode == "headers":
                payload = head
            else:
                conn.sendall(head)
                payload = b"x" * 100000
            started = time.monotonic()
            for byte in payload:
                if self.stop.is_set() or time.monotonic() - started > self.limit_s:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up: what we want
                time.sleep(self.interval)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_http_total_deadline_fires_against_a_trickling_server(mode, monkeypatch):
    """Each byte arrives well within the per-read timeout, so only a total deadline enforced
    on every socket read can stop it (before the fix: the full trickle, 40 s here)."""
    monkeypatch.setenv("CUTOUT_ALLOW_PRIVATE_HOSTS", "1")
    monkeypatch.setenv("CUTOUT_STORAGE_READ_TIMEOUT", "5")
    monkeypatch.setenv("CUTOUT_STORAGE_HTTP_DEADLINE", "2")
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "1")
    server = TrickleServer(mode)
    try:
        started = time.monotonic()
        with pytest.raises(TransientStorageError, match="deadline"):
            storage.read_bytes(server.url)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert elapsed < 10, f"the 2 s deadline fired only after {elapsed:.1f} s"


# --- named pipes, devices, sockets, symlink loops ----------------------------------------------
def _in_thread(call, timeout: float = 10.0):
    """Run ``call`` on a thread; return (finished, result or exception). A blocked call is left
    behind (daemon) and reported as not finished, so the test fails instead of hanging."""
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get("value")


def _unblock_fifo(path: str) -> None:
    """Open the pipe's write end once, so a reader stuck in open() (the bug) is released."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture
def odd_folder(tmp_path):
    """Two images beside a FIFO, a unix socket, a broken link, a self-loop and a link to an ancestor."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"a")
    (root / "sub" / "b.png").write_bytes(b"b")
    os.mkfifo(root / "pipe.png")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.png"))
    (root / "broken.png").symlink_to(root / "nowhere.png")
    (root / "self.png").symlink_to(root / "self.png")
    (root / "sub" / "up").symlink_to(root)
    yield root
    server.close()
    _unblock_fifo(str(root / "pipe.png"))


def test_listing_skips_and_counts_what_is_not_a_regular_file(odd_folder):
    skips = storage.ListingSkips()
    finished, listed = _in_thread(lambda: list(storage.list_uris(str(odd_folder), skips=skips)))
    assert finished, "listing blocked"
    assert not isinstance(listed, BaseException), listed
    assert listed == [str(odd_folder / "a.png"), str(odd_folder / "sub" / "b.png")]  # each once
    assert skips.total == 5
    assert skips.counts == {"not a regular file": 2, "broken symlink": 1, "symlink loop": 2}


def test_a_listing_without_a_skip_counter_still_skips(odd_folder):
    finished, listed = _in_thread(lambda: list(storage.list_uris(odd_folder.as_uri())))
    assert finished and listed == [f"{odd_folder.as_uri()}/a.png", f"{odd_folder.as_uri()}/sub/b.png"]


@pytest.mark.parametrize("name", ["pipe.png", "sock.png", "/dev/zero", "/dev/null", "self.png"])
def test_reading_an_odd_file_fails_fast_with_a_typed_permanent_error(odd_folder, name):
    from cutout.jobs.errors import NotARegularFileError

    path = name if name.startswith("/") else str(odd_folder / name)
    finished, outcome = _in_thread(lambda: storage.read_bytes(path, max_bytes=1024))
    if not finished:
        _unblock_fifo(path)
    assert finished, f"reading {name} blocked"
    expected = StorageError if name == "self.png" else NotARegularFileError
    assert isinstance(outcome, expected), repr(outcome)
    assert outcome.permanent


# --- the worker's allowlist of sources -----------------------------------------------------------
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from cutout.jobs.errors import SourceNotAllowedError  # noqa: E402


def _policy(monkeypatch, allowed: str | None = None, private: bool = False):
    from cutout.jobs.allowlist import SourcePolicy

    if allowed is None:
        monkeypatch.delenv("CUTOUT_ALLOWED_SOURCES", raising=False)
    else:
        monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", allowed)
    monkeypatch.setenv("CUTOUT_ALLOW_PRIVATE_HOSTS", "1" if private else "0")
    return SourcePolicy.from_env()


def test_file_scheme_alone_allows_every_local_file(monkeypatch):
    _policy(monkeypatch, "file://").check("/etc/hostname")


def test_default_allowlist_takes_buckets_and_the_web_but_no_local_file(monkeypatch):
    policy = _policy(monkeypatch)
    for uri in ("s3://any-bucket/k.jpg", "https://example.com/a.jpg", "http://example.com/a.jpg"):
        policy.check(uri)
    for uri in ("file:///etc/passwd", "/etc/passwd", "relative/x.jpg", "file://localhost/etc/hosts"):
        with pytest.raises(SourceNotAllowedError):
            policy.check(uri)


def test_a_listed_folder_allows_only_what_really_lies_below_it(monkeypatch, tmp_path):
    allowed, other = tmp_path / "data", tmp_path / "data2"
    allowed.mkdir()
    other.mkdir()
    (allowed / "ok.jpg").write_bytes(b"x")
    (other / "no.jpg").write_bytes(b"x")
    (allowed / "escape.jpg").symlink_to(other / "no.jpg")
    policy = _policy(monkeypatch, f"{allowed.as_uri()}/")
    policy.check(str(allowed / "ok.jpg"))
    policy.check((allowed / "ok.jpg").as_uri())
    for uri in (str(other / "no.jpg"), f"{allowed}/../data2/no.jpg", str(allowed / "escape.jpg"),
                "s3://bucket/k.jpg", "https://example.com/a.jpg"):
        with pytest.raises(SourceNotAllowedError):
            policy.check(uri)


def test_bucket_and_host_prefixes_end_at_a_boundary(monkeypatch):
    policy = _policy(monkeypatch, "s3://photos/in/,s3://shared,https://cdn.example.com,https://img.example.org/pub/")
    for uri in ("s3://photos/in/a.jpg", "s3://shared/x/y.png", "https://cdn.example.com/a.jpg",
                "https://CDN.example.com/a.jpg".lower(), "https://img.example.org/pub/a/b.jpg?size=2"):
        policy.check(uri)
    for uri in ("s3://photos/input/a.jpg", "s3://photos/in/../secret/a.jpg", "s3://shared-other/a.jpg",
                "s3://photos/a.jpg", "https://cdn.example.com.evil.org/a.jpg",
                "https://cdn.example.com@evil.org/a.jpg", "https://img.example.org/pub/../admin",
                "https://img.example.org/pub/%2e%2e/admin", "https://img.example.org/public/x.jpg",
                "http://cdn.example.com/a.jpg", "/etc/passwd"):
        with pytest.raises(SourceNotAllowedError):
            policy.check(uri)


def test_private_addresses(monkeypatch):
    policy = _policy(monkeypatch)
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1",
                    "fe80::1", "::ffff:127.0.0.1", "0.0.0.0", "100.64.0.1", "fd00::1", "224.0.0.1"):
        assert policy.is_private(address), address
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert not policy.is_private(address), address


class _Redirector(BaseHTTPRequestHandler):
    target = ""

    def log_message(self, *args):
        return

    def do_GET(self):
        if self.path == "/go":
            self.send_response(302)
            self.send_header("Location", _Redirector.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"bytes")


@pytest.fixture
def two_servers():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Redirector) for _ in range(2)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    first, second = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    yield first, second
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_to_a_private_address_is_refused_unless_allowed(monkeypatch, two_servers):
    first, _ = two_servers
    with pytest.raises(SourceNotAllowedError, match="private"):
        storage.read_bytes(f"{first}/a.jpg", policy=_policy(monkeypatch))
    assert storage.read_bytes(f"{first}/a.jpg", policy=_policy(monkeypatch, private=True)) == b"bytes"
    assert storage.read_bytes(f"{first}/a.jpg", policy=_policy(monkeypatch, f"{first}/")) == b"bytes"  # named
    assert storage.read_bytes(f"{first}/a.jpg") == b"bytes"  # no policy: `cutout run`, the user's own rights


def test_redirects_must_stay_inside_the_allowlist_and_off_private_addresses(monkeypatch, two_servers):
    first, second = two_servers
    _Redirector.target = f"{second}/secret"
    with pytest.raises(SourceNotAllowedError, match="not in the allowlist"):
        storage.read_bytes(f"{first}/go", policy=_policy(monkeypatch, f"{first}/", private=True))
    with pytest.raises(SourceNotAllowedError, match="private"):  # allowed scheme-wide, but loopback
        storage.read_bytes(f"{first}/go", policy=_policy(monkeypatch, f"{first}/,http://"))
    _Redirector.target = "file:///etc/passwd"
    with pytest.raises(StorageError):
        storage.read_bytes(f"{first}/go", policy=_policy(monkeypatch, f"{first}/"))
    _Redirector.target = f"{second}/fine"
    assert storage.read_bytes(f"{first}/go", policy=_policy(monkeypatch, "http://", private=True)) == b"bytes"


def test_cutout_run_over_a_folder_with_a_pipe_finishes(tmp_path):
    """Before: `cutout run` listed the FIFO as an input and blocked forever opening it."""
    import io
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    buffer = io.BytesIO()
    image = np.full((40, 50, 3), 230, np.uint8)
    image[10:30, 10:30] = (20, 40, 200)
    Image.fromarray(image).save(buffer, format="PNG")
    (folder / "a.png").write_bytes(buffer.getvalue())
    os.mkfifo(folder / "pipe.png")
    (folder / "loop").symlink_to(folder)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cutout.jobs.cli", "run", str(folder), "--out", str(tmp_path / "out"),
             "--model", "threshold", "--matting", "none", "--no-progress"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        _unblock_fifo(str(folder / "pipe.png"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "a.png").is_file()
    assert "pipe.png: not a regular file" in done.stderr and "symlink loop" in done.stderr
