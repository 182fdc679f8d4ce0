"""Worker metrics, scraped over HTTP from a real ``cutout worker`` that ran a real job.

A small local job (threshold model, no weights) with good and bad inputs runs on a worker with
a solo pool and on one with a prefork pool (pool processes count into prometheus_client's
multiprocess store; the main process serves the sum); the scraped counters must match the
job's records.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.services import LOCAL_TEST_SOURCES, free_port

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(7):
        image = np.full((64, 64, 3), 230, np.uint8)
        image[16:48, 16:48] = rng.integers(0, 100, 3)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        (folder / f"object_{i}.png").write_bytes(buffer.getvalue())
    (folder / "notes.png").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")


def scrape(port: int) -> tuple[dict[str, list], str]:
    """Samples by metric family name, and the page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}, text


def value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_scraped_metrics_match_the_jobs_records(pool, redis_client, redis_url, tmp_path):
    from cutout.jobs import manifest, manifest_parts
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_job

    source = tmp_path / "in"
    make_inputs(source)
    port = free_port()
    queue = f"metrics-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **LOCAL_TEST_SOURCES, "CUTOUT_BROKER_URL": redis_url, "CUTOUT_REDIS_URL": redis_url,
           "CUTOUT_METRICS_PORT": str(port), "CUTOUT_METRICS_ADDR": "127.0.0.1",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics-store"),
           "CUTOUT_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if pool == "prefork":
        env["CUTOUT_TASK_EVENTS"] = "1"  # for Flower; checked below on Redis' event channels
    events = redis_client.pubsub()
    events.psubscribe("*celeryev*")
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cutout.jobs.cli", "worker", "--pool", pool, "--concurrency", "1",
             "--queues", queue, "--hostname", f"m-{uuid.uuid4().hex[:6]}@%h"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        spec = JobSpec(sources=(source.as_uri() + "/",), destination=(tmp_path / "out").as_uri(),
                       shard_size=4, queue=queue, pipeline=PipelineOptions(model="threshold", matting="none"))
        job = submit_job(spec, broker_url=redis_url, redis_url=redis_url)
        deadline = time.monotonic() + 120
        while len(manifest.done_shard_ids(job.job_prefix)) < job.shards_total:
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        time.sleep(0.5)  # the task's last observations land just after its records
        families, text = scrape(port)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
    channels = set()
    while (message := events.get_message(timeout=0.1)) is not None:
        channels.add(message["channel"].decode() if isinstance(message["channel"], bytes) else str(message["channel"]))
    events.close()
    task_events = {c for c in channels if ".celeryev/task." in c}  # task.succeeded, or batched
    assert bool(task_events) == (pool == "prefork"), channels
    manifest_parts.build_missing(job.job_prefix)
    recs = list(manifest_parts.iter_rows(job.job_prefix))
    assert len(recs) == 9

    items = families["cutout_items"]
    expected = Counter((r["status"], r["error_class"] or "") for r in recs)
    assert sum(n for (status, _), n in expected.items() if status == "failed") == 2
    for (status, error_class), number in expected.items():
        assert value(items, "cutout_items_total", status=status, error_class=error_class) == number
    assert value(items, "cutout_items_total") == len(recs)

    stage_counts = Counter(stage for r in recs for stage in r["timings"])
    stages = families["cutout_stage_seconds"]
    for stage, number in stage_counts.items():
        assert value(stages, "cutout_stage_seconds_count", stage=stage) == number
        seconds = sum(r["timings"].get(stage, 0.0) for r in recs)
        assert value(stages, "cutout_stage_seconds_sum", stage=stage) == pytest.approx(seconds, rel=1e-6, abs=1e-9)

    assert value(families["cutout_shard_seconds"], "cutout_shard_seconds_count") == job.shards_total
    assert value(families["cutout_shards"], "cutout_shards_total", outcome="processed") == job.shards_total
    assert value(families["cutout_model_load_seconds"], "cutout_model_load_seconds_count") == 1
    assert value(families["cutout_queue_depth"], "cutout_queue_depth", queue=queue) == 0
    assert value(families["cutout_worker_processes"], "cutout_worker_processes") == 1
    busy = value(families["cutout_worker_busy_seconds"], "cutout_worker_busy_seconds_total")
    shard_seconds = value(families["cutout_shard_seconds"], "cutout_shard_seconds_sum")
    assert busy >= shard_seconds > 0
    if os.environ.get("CUTOUT_PRINT_METRICS"):
        print("\n".join(line for line in text.splitlines() if line.startswith("cutout_")))


def test_queue_depth_is_read_from_the_broker_when_scraped(redis_client, redis_url):
    from cutout.workers.telemetry import WorkerCollector

    for _ in range(3):
        redis_client.lpush("depth-test", b"{}")
    redis_client.lpush("depth-test\x06\x163", b"{}")  # kombu's list for priority 3
    redis_client.hset("unacked", "tag", b"{}")
    collector = WorkerCollector(redis_url, ["depth-test", "empty-queue"], processes=4)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in collector.collect() for s in family.samples}
    assert samples[("cutout_queue_depth", (("queue", "depth-test"),))] == 4
    assert samples[("cutout_queue_depth", (("queue", "empty-queue"),))] == 0
    assert samples[("cutout_unacked_messages", ())] == 1
    assert samples[("cutout_worker_processes", ())] == 4
