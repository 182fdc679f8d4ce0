"""A tiny threaded HTTP reverse proxy that can answer ``503 SlowDown`` on demand.

Put it between a client (boto3, a Celery worker) and the moto S3 server by pointing
``AWS_ENDPOINT_URL`` at ``proxy.url``. It forwards every request unchanged until told to fail.

In-process (what tests/conftest.py does: a background thread in the pytest process; worker
subprocesses simply connect to it, so the test switches faults by method calls)::

    proxy = FaultProxy(upstream="http://127.0.0.1:5000").start()
    proxy.fail_next(3)          # the next 3 matching requests get 503 SlowDown
    proxy.fail_for(2.0)         # every matching request for 2 seconds
    proxy.fail_fraction(0.25)   # each matching request with probability 0.25, until reset
    proxy.reset()

As a separate process, steered by a JSON control file (re-read whenever it changes)::

    python -m tests.faultproxy --upstream http://127.0.0.1:5000 --port 5001 --control /tmp/ctl.json
    echo '{"fail_next": 3, "methods": ["PUT"]}' > /tmp/ctl.json
    echo '{"fail_seconds": 5}' > /tmp/ctl.json

``methods`` and ``path_contains`` narrow which requests fail (e.g. only uploads).
``latency_s`` (constructor) delays every forwarded request, like a far-away object store.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faultproxy</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, *, port: int = 0, control_file: str | None = None,
                 latency_s: float = 0.0):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.control_file = control_file
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self._fail_left = 0
        self._fail_until = 0.0
        self._fraction = 0.0
        self._random = random.Random(0)
        self._methods: set[str] | None = None
        self._path_contains: str | None = None
        self._control_mtime: float | None = None
        self.requests_seen = 0
        self.requests_failed = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    # --- switching faults -----------------------------------------------------------------------
    def fail_next(self, count: int, *, methods=None, path_contains: str | None = None) -> None:
        with self._lock:
            self._fail_left, self._fail_until, self._fraction = count, 0.0, 0.0
            self._set_filter(methods, path_contains)

    def fail_for(self, seconds: float, *, methods=None, path_contains: str | None = None) -> None:
        with self._lock:
            self._fail_left, self._fail_until, self._fraction = 0, time.time() + seconds, 0.0
            self._set_filter(methods, path_contains)

    def fail_fraction(self, fraction: float, *, methods=None, path_contains: str | None = None) -> None:
        """Fail each matching request with probability ``fraction`` (a flaky store), until reset."""
        with self._lock:
            self._fail_left, self._fail_until, self._fraction = 0, 0.0, fraction
            self._set_filter(methods, path_contains)

    def reset(self) -> None:
        """No faults, counters back to zero."""
        self.fail_next(0)
        with self._lock:
            self.requests_seen = self.requests_failed = 0

    def _set_filter(self, methods, path_contains) -> None:
        self._methods = {m.upper() for m in methods} if methods else None
        self._path_contains = path_contains

    def _should_fail(self, method: str, path: str) -> bool:
        with self._lock:
            self._apply_control_file()
            self.requests_seen += 1
            if self._methods and method not in self._methods:
                return False
            if self._path_contains and self._path_contains not in path:
                return False
            if self._fail_left > 0:
                self._fail_left -= 1
            elif time.time() >= self._fail_until and not (self._fraction and self._random.random() < self._fraction):
                return False
            self.requests_failed += 1
            return True

    def _apply_control_file(self) -> None:
        """Pick up a changed control file (subprocess mode); called with the lock held."""
        if not self.control_file:
            return
        try:
            mtime = os.stat(self.control_file).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._control_mtime:
            return
        self._control_mtime = mtime
        with open(self.control_file) as handle:
            text = handle.read().strip()
        control = json.loads(text) if text else {}
        self._fail_left = int(control.get("fail_next", 0))
        seconds = float(control.get("fail_seconds", 0))
        self._fail_until = time.time() + seconds if seconds else 0.0
        self._set_filter(control.get("methods"), control.get("path_contains"))

    # --- serving --------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def log_message(self, *args) -> None:  # quiet: pytest output stays readable
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers, dropped
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                if proxy._should_fail(self.command, self.path):
                    self._reply(503, [("Content-Type", "application/xml")], SLOWDOWN_BODY)
                    return
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    kept = [(k, v) for k, v in response.getheaders()
                            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]
                    self._reply(response.status, kept, data, head=self.command == "HEAD",
                                length=response.getheader("Content-Length"))
                finally:
                    upstream.close()

            def _reply(self, status, headers, data, *, head=False, length=None) -> None:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", length if head and length else str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control", help="JSON control file, re-read when it changes")
    args = parser.parse_args()
    proxy = FaultProxy(args.upstream, port=args.port, control_file=args.control)
    print(proxy.url, flush=True)
    proxy._server.serve_forever()


if __name__ == "__main__":
    main()
