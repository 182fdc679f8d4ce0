"""Hostile inputs end to end: a mixed corpus of broken, odd and special files through ``cutout
run`` and through a real job (redis-server, a real ``cutout worker`` process, file:// storage),
and inputs on a host that fails (HTTP 500) or never answers, then ``retry-failed``.

The rule checked everywhere: every input ends with exactly one record (a FIFO or a symlink loop
may instead be skipped by the listing), a failure carries a typed reason, good neighbours are
done, the run or job completes, and nothing outside the destination is touched.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import images
from tests.test_item_loop import HostileHost
from tests.test_job_integration import (
    WORKER_ENV,
    WorkerFleet,
    as_path,
    generated_objects,
    read_manifest,
    wait_for_job,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent
# Fast per-item retries against the loopback host that never answers; loopback sources allowed.
FAST_ITEM_ENV = {
    "CUTOUT_STORAGE_CONNECT_TIMEOUT": "0.5",
    "CUTOUT_STORAGE_READ_TIMEOUT": "1",
    "CUTOUT_STORAGE_RETRIES": "2",
    "CUTOUT_STORAGE_BACKOFF_S": "0.02",
    "CUTOUT_ITEM_BACKOFF_S": "0.05",
    "CUTOUT_ALLOW_PRIVATE_HOSTS": "1",
}

DONE, FAILED, EITHER, RECORD_OR_SKIP = "done", "failed", "done or a typed failure", "one record or skipped"


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(images.png_rgb_bytes())
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def _photo_with_alpha() -> bytes:
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (200, 180, 40)
    rgba[16:48, 16:48, 3] = 255
    return _png(rgba)


def _float_tiff_with_inf() -> bytes:
    values = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    values[3, 3] = np.inf
    return images.float_tiff(values)


def write_corpus(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The corpus on disk: a folder and a list file whose entries climb out with ``../``.
    Returns the sources and input path -> what it must become.

    A symlink loop sits in the folder (the listing skips and counts it) and is named by the
    list file (read directly: a typed record).
    """
    root = tmp_path / "corpus"
    root.mkdir(parents=True)
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, fate: str) -> None:
        (root / name).write_bytes(data)
        expected[str(root / name)] = fate

    for index, data in enumerate(generated_objects(3, seed=11).values()):
        put(f"good_{index}.png", data, DONE)
    put("empty.png", images.empty_bytes(), FAILED)
    put("truncated.jpg", images.truncated_jpeg(), FAILED)
    put("text.jpg", images.text_file(), FAILED)
    put("random.png", images.random_bytes(), FAILED)
    put("bomb.png", images.giant_png_header(), FAILED)
    put("bad_crc.png", _bad_crc_png(), EITHER)  # its message is the decode helper's to fix
    put("float_inf.tif", _float_tiff_with_inf(), EITHER)  # likewise
    put("alpha.png", _photo_with_alpha(), DONE)
    put("l" * 246 + ".png", images.png_rgb_bytes(), DONE)  # 250 bytes
    put("tab\tname.png", images.png_rgb_bytes(), DONE)
    put("new\nline.png", images.png_rgb_bytes(), DONE)
    put("ünïcode ✓.png", images.png_rgb_bytes(), DONE)
    put("x\\..\\..\\escape.png", images.png_rgb_bytes(), DONE)  # backslashes read as separators
    os.mkfifo(root / "pipe.png")
    expected[str(root / "pipe.png")] = RECORD_OR_SKIP
    os.symlink("loop.png", root / "loop.png")
    expected[str(root / "loop.png")] = RECORD_OR_SKIP
    (tmp_path / "links").mkdir()
    os.symlink("loop.png", tmp_path / "links" / "loop.png")
    expected[str(tmp_path / "links" / "loop.png")] = RECORD_OR_SKIP
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(images.png_rgb_bytes())
    expected[str(tmp_path / "elsewhere" / "x.png")] = DONE
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "inputs.txt"
    listing.write_text("../links/loop.png\n../elsewhere/x.png\n")
    return [str(root), str(listing)], expected


def tree_snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry below ``root`` except ``skip``, by lstat (never follows links, never opens)."""
    snapshot = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) != skip]
        for name in dirs + files:
            info = os.lstat(Path(folder, name))
            snapshot[str(Path(folder, name))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return snapshot


def check_records(records: list[dict], expected: dict[str, str], out: Path) -> None:
    from cutout.jobs import errors

    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(as_path(record["input_uri"]), []).append(record)
    assert set(by_name) <= set(expected), sorted(set(by_name) - set(expected))
    for name, fate in expected.items():
        found = by_name.get(name, [])
        if fate == RECORD_OR_SKIP:
            assert len(found) <= 1, f"{name!r}: {len(found)} records"
        else:
            assert len(found) == 1, f"{name!r}: {len(found)} records"
        for record in found:
            if record["status"] == "failed":
                assert fate != DONE, f"{name!r} failed: {record['error_class']}: {record['error']}"
                kind = getattr(errors, record["error_class"] or "", None)
                assert isinstance(kind, type) and issubclass(kind, errors.CutoutError), record
                assert record["error"] and record["stage"]
            else:
                assert fate != FAILED and record["status"] == "done", (name, record)
                (output,) = [Path(as_path(uri)) for uri in record["output_uris"]]
                assert out in output.parents and output.is_file()
    (alpha,) = [found[0] for name, found in by_name.items() if name.endswith("/alpha.png")]
    alpha_output = Path(as_path(alpha["output_uris"][0]))
    assert np.asarray(Image.open(alpha_output))[..., 3][:10].max() == 0  # transparent stays so


def test_hostile_corpus_through_cutout_run(tmp_path):
    out = tmp_path / "out"
    sources, expected = write_corpus(tmp_path)
    before = tree_snapshot(tmp_path, skip=out)
    result = subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "run", *sources, "--out", str(out), "--model", "threshold",
         "--matting", "none", "--no-progress"],
        cwd=REPO_ROOT, env={**os.environ, **FAST_ITEM_ENV}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    skipped = next(line for line in result.stdout.splitlines() if "skipped by the listing" in line)
    assert "1 symlink loop" in skipped and "1 not a regular file" in skipped  # the loop, the FIFO
    records = [json.loads(line) for line in (out / "_cutout_run.jsonl").read_text().splitlines()]
    check_records(records, expected, out)
    assert tree_snapshot(tmp_path, skip=out) == before


@pytest.fixture(scope="module")
def worker(redis_server, tmp_path_factory):
    env = {**os.environ, **WORKER_ENV, **FAST_ITEM_ENV,
           "CUTOUT_BROKER_URL": redis_server.url, "CUTOUT_REDIS_URL": redis_server.url,
           # the tests' local files and loopback host are outside a worker's default allowlist
           "CUTOUT_ALLOWED_SOURCES": f"{tmp_path_factory.getbasetemp().resolve().as_uri()}/,http://"}
    os.environ["CUTOUT_BROKER_URL"] = redis_server.url
    fleet = WorkerFleet(env, tmp_path_factory.mktemp("hostile-worker-logs"))
    fleet.ensure(1)
    yield {"fleet": fleet, "env": env, "redis_url": redis_server.url}
    fleet.stop()


def submit(sources: list[str], destination: str, redis_url: str):
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_job

    spec = JobSpec(sources=tuple(sources), destination=destination,
                   pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=5)
    return submit_job(spec, broker_url=redis_url, redis_url=redis_url)


def test_hostile_corpus_through_a_real_job(worker, tmp_path):
    out = tmp_path / "out"
    sources, expected = write_corpus(tmp_path)
    before = tree_snapshot(tmp_path, skip=out)
    result = submit(sources, out.as_uri(), worker["redis_url"])
    wait_for_job(result.job_prefix, result.shards_total, worker["fleet"])
    check_records(read_manifest(result.job_prefix), expected, out)
    assert tree_snapshot(tmp_path, skip=out) == before


def test_inputs_on_a_failing_host_are_recorded_then_retried_alone(worker, tmp_path):
    """One URL answers 500 forever, one host never answers: the job still completes with both
    recorded ``TransientStorageError``; ``retry-failed --error-class`` redoes only those two."""
    from cutout.jobs import manifest

    host = HostileHost()
    try:
        folder = tmp_path / "in"
        folder.mkdir()
        good = []
        for index, data in enumerate(generated_objects(4, seed=5).values()):
            (folder / f"g{index}.png").write_bytes(data)
            good.append(str(folder / f"g{index}.png"))
        fail, hang, served = (f"{host.url}/{name}.png" for name in ("fail", "hang", "good"))
        listing = folder / "list.txt"
        listing.write_text("\n".join([good[0], fail, good[1], hang, served, good[2], good[3]]) + "\n")
        result = submit([str(listing)], (tmp_path / "out").as_uri(), worker["redis_url"])
        wait_for_job(result.job_prefix, result.shards_total, worker["fleet"])
        first = {r["input_uri"]: r for r in read_manifest(result.job_prefix)}
        assert len(first) == 7
        assert {u for u, r in first.items() if r["status"] == "done"} == {*good, served}
        for uri in (fail, hang):
            assert first[uri]["error_class"] == "TransientStorageError", first[uri]
            assert uri in first[uri]["error"] and "gave up" in first[uri]["error"]

        host.requests.clear()
        host.healthy = True  # the host recovers; the user retries that class of failure
        retry = subprocess.run(
            [sys.executable, "-m", "cutout.jobs.cli", "retry-failed", result.job_id, "--error-class",
             "TransientStorageError"], cwd=REPO_ROOT, env=worker["env"], capture_output=True, text=True,
            timeout=120)
        assert retry.returncode == 0, retry.stderr
        assert "2 failed inputs" in retry.stdout
        wait_for_job(result.job_prefix, result.shards_total, worker["fleet"])
        again = {r["input_uri"]: r for r in read_manifest(result.job_prefix)}
        assert host.requests == {"/fail.png": 1, "/hang.png": 1}  # nothing else was read again
        assert again[fail]["status"] == again[hang]["status"] == "done"
        assert all(again[u] == first[u] for u in (*good, served))
        assert len(list(manifest.iter_records(result.job_prefix))) == 7
    finally:
        host.stop()
