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
