"""The one item loop (``workers/items.py``) under a shard: one bad read or write is one record.

Real parts: inputs on disk and on a loopback HTTP server that answers 500 or never answers;
the shard runs through ``process_shard`` exactly as the Celery task calls it.
"""
from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import images


class HostileHost:
    """A loopback HTTP server: ``/good.png`` is served, ``/fail.png`` always 500s, and
    ``/hang.png`` accepts the connection and never answers (until the server stops); once
    ``healthy`` is set, every path is served."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.healthy = False
        self.release = threading.Event()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                host.requests[self.path] = host.requests.get(self.path, 0) + 1
                if not host.healthy and self.path.startswith("/hang"):
                    host.release.wait(60)
                    return
                if not host.healthy and self.path.startswith("/fail"):
                    self.send_error(500, "Internal Server Error")
                    return
                body = images.png_rgb_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile_host():
    host = HostileHost()
    yield host
    host.stop()


@pytest.fixture(autouse=True)
def workers_may_read_these_tests_inputs(tmp_path, monkeypatch):
    """Local files and the loopback host are outside a worker's default source allowlist."""
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", f"{tmp_path.as_uri()}/,http://")
    monkeypatch.setenv("CUTOUT_ALLOW_PRIVATE_HOSTS", "1")


@pytest.fixture
def fast_item_retries(monkeypatch):
    """Short timeouts and backoffs so a host that never answers costs a second, not minutes."""
    monkeypatch.setenv("CUTOUT_STORAGE_CONNECT_TIMEOUT", "0.3")
    monkeypatch.setenv("CUTOUT_STORAGE_READ_TIMEOUT", "0.3")  # some versions wait for headers this long
    monkeypatch.setenv("CUTOUT_STORAGE_RETRIES", "2")
    monkeypatch.setenv("CUTOUT_STORAGE_BACKOFF_S", "0.01")
    monkeypatch.setenv("CUTOUT_ITEM_BACKOFF_S", "0.01")
    monkeypatch.setenv("CUTOUT_ITEM_ATTEMPTS", "3")


def make_job(tmp_path: Path, sources: list[str], destination: str | None = None) -> str:
    """Spec and shard files as ``submit`` writes them (no queue needed to run a shard by hand)."""
    from cutout.jobs import manifest, sharding
    from cutout.jobs.sources import iter_source_items
    from cutout.jobs.spec import JobSpec, PipelineOptions

    spec = JobSpec(sources=tuple(sources), destination=destination or (tmp_path / "out").as_uri(),
                   pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=100)
    prefix = sharding.job_prefix(spec.destination, spec.job_id)
    manifest.save_spec(prefix, spec)
    for shard in sharding.iter_shards(iter_source_items(spec.sources), destination=spec.destination,
                                      extension=spec.pipeline.extension, shard_size=spec.shard_size):
        sharding.write_shard(prefix, shard)
    return prefix


def run_shard(prefix: str, **kwargs) -> dict:
    from cutout.jobs import manifest
    from cutout.workers.shard import process_shard

    run = process_shard(prefix, "s000000", worker_name="test", **kwargs)
    assert run.stats is not None and manifest.shard_done(prefix, "s000000")
    return {r.input_uri: r for r in manifest.read_shard_records(prefix, "s000000")}


def write_good(folder: Path, names: list[str]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(images.png_rgb_bytes())
    return [str(folder / name) for name in names]


def test_reads_that_keep_failing_are_recorded_and_the_shard_completes(tmp_path, hostile_host, fast_item_retries):
    good = write_good(tmp_path / "in", ["a.png", "b.png"])
    fail, hang, served = (f"{hostile_host.url}/{name}.png" for name in ("fail", "hang", "good"))
    listing = tmp_path / "in" / "list.txt"
    listing.write_text("\n".join([good[0], fail, hang, served, good[1]]) + "\n")
    records = run_shard(make_job(tmp_path, [str(listing)]))
    assert len(records) == 5
    assert {uri for uri, r in records.items() if r.status == "done"} == {good[0], good[1], served}
    for uri in (fail, hang):
        record = records[uri]
        assert (record.status, record.error_class) == ("failed", "TransientStorageError")
        assert "gave up after 3 attempt(s)" in record.error and uri in record.error
    assert "HTTP 500" in records[fail].error
    # bounded: three item attempts, each with the storage layer's two tries
    assert hostile_host.requests["/fail.png"] == 6


def test_the_total_time_cap_stops_item_retries_early(tmp_path, hostile_host, fast_item_retries, monkeypatch):
    monkeypatch.setenv("CUTOUT_ITEM_RETRY_MAX_S", "0")  # no time left for a second attempt
    hang = f"{hostile_host.url}/hang.png"
    listing = tmp_path / "list.txt"
    listing.write_text(hang + "\n")
    records = run_shard(make_job(tmp_path, [str(listing)]))
    assert "gave up after 1 attempt(s)" in records[hang].error
    assert hostile_host.requests["/hang.png"] <= 2  # the storage layer's tries only


def test_outputs_that_cannot_be_written_are_recorded_and_neighbours_written(tmp_path):
    """A 251-byte stem whose collision rename (``N.png.png``) is over 255 bytes, and a folder
    blocked by a file in the destination: two records, the other outputs written."""
    source, out = tmp_path / "in", tmp_path / "out"
    stem = "n" * 251
    source.mkdir()
    (source / f"{stem}.jpg").write_bytes(images.jpeg_bytes())  # first in order: N.png
    colliding = write_good(source, [f"{stem}.png"])[0]  # then N.png.png: 259 bytes
    good = write_good(source, ["ok.png"]) + [str(source / f"{stem}.jpg")]
    blocked = write_good(source / "sub", ["x.png"])[0]
    out.mkdir()
    (out / "sub").write_text("a file where the output folder should be")
    records = run_shard(make_job(tmp_path, [str(source)], destination=str(out)))
    assert len(records) == 4
    long_name = records[colliding]
    for record in (long_name, records[blocked]):
        assert (record.status, record.error_class, record.stage) == ("failed", "OutputWriteError", "write")
        assert "cannot write the output" in record.error
    assert "File name too long" in long_name.error
    assert all(records[uri].status == "done" for uri in good)
    assert (out / "ok.png").is_file() and (out / f"{stem}.png").is_file()
    assert sorted(os.listdir(out)) == sorted(["ok.png", f"{stem}.png", "sub", "_cutout"])  # no temp files


def test_a_transient_write_error_is_an_item_record_not_a_shard_failure(tmp_path, monkeypatch):
    from cutout.jobs import storage
    from cutout.jobs.errors import TransientStorageError

    real_write = storage.write_bytes

    def flaky_write(uri, data, **kwargs):
        if uri.endswith("/b.png"):
            raise TransientStorageError(f"503 SlowDown writing {uri}")
        return real_write(uri, data, **kwargs)

    monkeypatch.setattr(storage, "write_bytes", flaky_write)
    monkeypatch.setenv("CUTOUT_ITEM_BACKOFF_S", "0.01")
    good = write_good(tmp_path / "in", ["a.png", "b.png", "c.png"])
    records = run_shard(make_job(tmp_path, [str(tmp_path / "in")]))
    assert [records[u].status for u in good] == ["done", "failed", "done"]
    assert records[good[1]].error_class == "TransientStorageError"
    assert "SlowDown" in records[good[1]].error and "gave up after 3 attempt(s)" in records[good[1]].error


def test_retry_of_a_transient_failure_redoes_only_that_item(tmp_path, hostile_host, fast_item_retries):
    """What ``retry-failed --error-class TransientStorageError`` asks a worker to do."""
    good = write_good(tmp_path / "in", ["a.png"])
    fail, bad = f"{hostile_host.url}/fail.png", tmp_path / "in" / "bad.png"
    bad.write_bytes(images.text_file())
    listing = tmp_path / "in" / "list.txt"
    listing.write_text("\n".join([good[0], fail, str(bad)]) + "\n")
    prefix = make_job(tmp_path, [str(listing)])
    first = run_shard(prefix)
    assert first[fail].error_class == "TransientStorageError"
    hostile_host.requests.clear()
    again = run_shard(prefix, redo_failed=True, error_class="TransientStorageError")
    assert hostile_host.requests == {"/fail.png": 6}  # only that input was read again
    assert again[good[0]] == first[good[0]] and again[str(bad)] == first[str(bad)]


def test_a_hand_trimap_that_cannot_be_read_fails_its_input_only(tmp_path):
    """The loop reads each input's hand trimap; an unreadable one is that input's record."""
    from cutout.jobs.sharding import ShardItem
    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.items import JobRecords, run_items
    from cutout.workers.pipeline import Pipeline

    items = []
    for name in ("locked", "plain"):
        (tmp_path / f"{name}.png").write_bytes(images.png_rgb_bytes())
        items.append(ShardItem(str(tmp_path / f"{name}.png"), f"{name}.png", str(tmp_path / "out" / f"{name}.png")))

    def trimaps(item):
        if "locked" in item.uri:
            raise PermissionError(13, "Permission denied")
        return None

    sink = JobRecords()
    run_items(items, pipeline=lambda: Pipeline(PipelineOptions(model="threshold")), sink=sink,
              record_fields={"model": "threshold", "config_hash": "x"}, trimaps=trimaps)
    locked, plain = (sink.records[item.uri] for item in items)
    assert (locked.status, locked.error_class) == ("failed", "StorageError")
    assert "hand trimap" in locked.error and "Permission denied" in locked.error
    assert plain.status == "done" and "no-hand-trimap: segmented by the model" in plain.notes
