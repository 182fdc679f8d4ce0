"""The submitter and the plain shard function, on a real redis-server and local files (no workers).

Messages stay in the Redis queue (nobody consumes them); shards are run by calling
``cutout.workers.shard.process_shard`` directly, which is exactly what the Celery task does.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import images

REPO_ROOT = Path(__file__).resolve().parent.parent
QUEUE = "cutout"


def write_inputs(folder: Path, good: int, bad: dict[str, bytes]) -> list[Path]:
    paths = []
    for i in range(good):
        path = folder / f"set{i % 3}" / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.full((40, 50, 3), 230, np.uint8)
        array[10:30, 10 + i % 10 : 30 + i % 10] = (20, 40, 200)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


@pytest.fixture
def job(tmp_path, redis_client, redis_url, monkeypatch):
    from cutout.jobs.spec import JobSpec, PipelineOptions

    source = tmp_path / "in"
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", f"{source.as_uri()}/")  # workers refuse local files by default
    bad = {"empty.png": images.empty_bytes(), "text.jpg": images.text_file()}
    paths = write_inputs(source, 10, bad)
    spec = JobSpec(
        sources=(str(source),), destination=(tmp_path / "out").as_uri(),
        pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=4,
    )
    return {"spec": spec, "paths": paths, "bad": set(bad), "redis": redis_client, "url": redis_url}


def submit(job):
    from cutout.jobs.submit import submit_job

    return submit_job(job["spec"], broker_url=job["url"], redis_url=job["url"])


def run_all_shards(prefix: str, **kwargs) -> list:
    from cutout.jobs import manifest
    from cutout.workers.shard import process_shard

    return [process_shard(prefix, shard_id, worker_name="test", **kwargs) for shard_id in manifest.all_shard_ids(prefix)]


def test_submit_writes_shards_and_enqueues_references_only(job):
    from cutout.jobs import manifest

    result = submit(job)
    assert (result.items_total, result.shards_total, result.shards_enqueued) == (12, 3, 3)
    assert manifest.load_totals(result.job_prefix) == (12, 3)
    messages = [json.loads(m) for m in job["redis"].lrange(QUEUE, 0, -1)]
    assert len(messages) == 3
    assert {message_kwargs(m)["shard_id"] for m in job["redis"].lrange(QUEUE, 0, -1)} == {"s000000", "s000001", "s000002"}
    for message in messages:
        assert message["headers"]["task"] == "cutout.process_shard"
        assert message["content-type"] == "application/json"
        assert len(message["body"]) < 1000  # references, not image bytes


def message_kwargs(raw: bytes) -> dict:
    """A Celery message in the Redis list: base64 JSON body ``[args, kwargs, embed]``."""
    message = json.loads(raw)
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return json.loads(body)[1]


def test_shard_runs_once_and_resubmit_does_no_work(job):
    from cutout.jobs import manifest

    result = submit(job)
    runs = run_all_shards(result.job_prefix)
    assert all(run.stats is not None for run in runs)
    again = run_all_shards(result.job_prefix)
    assert all(run.skipped_reason == "already done" for run in again)

    job["redis"].delete(QUEUE)
    resubmitted = submit(job)
    assert resubmitted.job_id == result.job_id
    assert (resubmitted.shards_enqueued, resubmitted.shards_already_done) == (0, 3)
    assert job["redis"].llen(QUEUE) == 0

    records = list(manifest.iter_records(result.job_prefix))
    assert sorted(r.input_uri for r in records) == sorted(str(p) for p in job["paths"])
    failed = {Path(r.input_uri).name for r in records if r.status == "failed"}
    assert failed == job["bad"]
    for record in records:
        if record.status == "done":
            output = record.output_uris[0]
            assert Image.open(output[len("file://"):] if output.startswith("file://") else output).mode == "RGBA"


def test_shard_reads_ahead_while_the_model_runs(job, monkeypatch):
    """The next batch downloads during the current batch's model pass (storage made slow here)."""
    from cutout.jobs import manifest, storage
    from cutout.workers import shard as shard_module
    from cutout.workers.pipeline import Pipeline

    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    reading = [0, 0]  # now, most at once
    real_read, real_run = storage.read_bytes, Pipeline.run

    def slow_read(uri, **kwargs):
        if "/_cutout/" not in uri:  # an input image, not the job's own files
            with lock:
                events.append(("read", Path(uri).name))
                reading[0] += 1
                reading[1] = max(reading)
            time.sleep(0.3)
            with lock:
                reading[0] -= 1
        return real_read(uri, **kwargs)

    def logged_run(self, inputs, **kwargs):
        events.append(("model", str(len(inputs))))
        return real_run(self, inputs, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", slow_read)
    monkeypatch.setattr(Pipeline, "run", logged_run)
    monkeypatch.setenv("CUTOUT_BATCH_SIZE", "2")
    result = submit(job)
    first = manifest.all_shard_ids(result.job_prefix)[0]  # 4 inputs: 2 batches of 2
    run = shard_module.process_shard(result.job_prefix, first, worker_name="test")
    assert run.stats is not None and sum(run.stats.counts.values()) == 4
    first_model_pass = events.index(("model", "2"))
    assert len([e for e in events[:first_model_pass] if e[0] == "read"]) == 4  # batch 2 read ahead
    assert reading[1] == 4  # both batches downloading at once, not one input after another
    records = manifest.read_shard_records(result.job_prefix, first)
    assert [r.input_uri for r in records] == [item.uri for item in read_shard_items(result.job_prefix, first)]
    assert all(r.timings["read"] >= 0.3 for r in records if r.status == "done")


def test_inputs_on_the_model_when_a_worker_died_run_alone_then_get_recorded(job, monkeypatch):
    """What SIGKILLed attempts leave behind (their in-flight marks), replayed by hand."""
    from cutout.jobs import manifest
    from cutout.jobs.progress import LiveProgress
    from cutout.workers import shard as shard_module
    from cutout.workers.pipeline import Pipeline

    batch_sizes: list[int] = []
    real_run = Pipeline.run

    def logged_run(self, inputs, **kwargs):
        batch_sizes.append(len(inputs))
        return real_run(self, inputs, **kwargs)

    monkeypatch.setattr(Pipeline, "run", logged_run)
    monkeypatch.setenv("CUTOUT_MAX_ITEM_CRASHES", "2")
    result = submit(job)
    progress = LiveProgress(job["redis"], result.job_id)
    first, second = manifest.all_shard_ids(result.job_prefix)[:2]

    def attempt(shard_id, **kwargs):
        batch_sizes.clear()
        shard_module.process_shard(result.job_prefix, shard_id, worker_name="test", progress=progress, **kwargs)
        return {r.input_uri: r for r in manifest.read_shard_records(result.job_prefix, shard_id)}

    def ok(uri: str) -> bool:
        return Path(uri).name not in job["bad"]

    # an attempt died with three inputs on the model: they run alone, the fourth as usual
    uris = [item.uri for item in read_shard_items(result.job_prefix, first)]
    progress.batch_on_model(first, uris[:3])
    records = attempt(first)
    assert batch_sizes == [1, 1, 1, 1]
    assert all((records[u].status == "done") == ok(u) for u in uris)
    assert progress.crash_history(first) == {u: 0 for u in uris[:3]}

    # attempts died twice with one input alone on the model: it is recorded, not run again
    uris = [item.uri for item in read_shard_items(result.job_prefix, second)]
    for _ in range(2):
        progress.batch_on_model(second, [uris[0]])
        progress.crash_history(second)  # what the next attempt reads when it starts
    records = attempt(second)
    assert batch_sizes == [3]
    assert records[uris[0]].status == "failed" and records[uris[0]].error_class == "WorkerCrashError"
    assert records[uris[0]].stage == "pipeline" and "died 2 times" in records[uris[0]].error
    assert all((records[u].status == "done") == ok(u) for u in uris[1:])

    # the user retries it: the crash history is forgotten and the input runs
    records = attempt(second, redo_failed=True, error_class="WorkerCrashError")
    assert batch_sizes == [1] and len(records) == 4
    assert (records[uris[0]].status == "done") == ok(uris[0])
    assert records[uris[0]].error_class != "WorkerCrashError"
    assert progress.crash_history(second) == {}


def read_shard_items(prefix: str, shard_id: str):
    from cutout.jobs import sharding

    return sharding.read_shard(prefix, shard_id).items


def test_partial_job_resubmit_enqueues_only_missing_shards_and_reuses_shard_files(job):
    from cutout.jobs import manifest
    from cutout.jobs.sharding import shard_uri
    from cutout.workers.shard import process_shard

    result = submit(job)
    first = manifest.all_shard_ids(result.job_prefix)[0]
    process_shard(result.job_prefix, first, worker_name="test")
    shard_file = shard_uri(result.job_prefix, first)
    shard_path = shard_file[len("file://"):] if shard_file.startswith("file://") else shard_file
    stamp = os.stat(shard_path).st_mtime_ns
    queued = job["redis"].llen(QUEUE)
    again = submit(job)  # the unfinished shards still have their messages: send no duplicates
    assert (again.shards_enqueued, again.shards_already_done) == (0, 1)
    assert job["redis"].llen(QUEUE) == queued
    job["redis"].delete(QUEUE)  # messages lost: `cutout resume` (force) re-enqueues what is missing
    from cutout.jobs.submit import submit_job

    forced = submit_job(job["spec"], broker_url=job["url"], redis_url=job["url"], force=True)
    assert (forced.shards_enqueued, forced.shards_already_done) == (2, 1)
    assert job["redis"].llen(QUEUE) == 2
    assert os.stat(shard_path).st_mtime_ns == stamp


def test_retry_failed_redoes_failed_items_and_keeps_each_input_once(job):
    from cutout.jobs import manifest
    from cutout.jobs.submit import retry_failed

    result = submit(job)
    run_all_shards(result.job_prefix)
    fixed = next(p for p in job["paths"] if p.name == "empty.png")
    fixed.write_bytes(images.png_rgb_bytes())
    job["redis"].delete(QUEUE)

    retry = retry_failed(result.job_id, redis_url=job["url"], broker_url=job["url"])
    assert retry.items_to_retry == 2
    kwargs = [message_kwargs(m) for m in job["redis"].lrange(QUEUE, 0, -1)]
    assert len(kwargs) == retry.shards_enqueued
    assert all(k["redo_failed"] is True and k["error_class"] is None for k in kwargs)
    from cutout.workers.shard import process_shard

    for shard_id in sorted(set(manifest.all_shard_ids(result.job_prefix)) - manifest.done_shard_ids(result.job_prefix)):
        process_shard(result.job_prefix, shard_id, worker_name="retry", redo_failed=True)
    records = list(manifest.iter_records(result.job_prefix))
    assert sorted(r.input_uri for r in records) == sorted(str(p) for p in job["paths"])
    by_name = {Path(r.input_uri).name: r for r in records}
    assert by_name["empty.png"].status == "done" and by_name["empty.png"].worker == "retry"
    assert by_name["text.jpg"].status == "failed" and by_name["text.jpg"].worker == "retry"
    untouched = [r for r in records if r.input_uri not in (str(fixed),) and r.status == "done"]
    assert all(r.worker == "test" for r in untouched), "good items were reprocessed"


def test_retry_failed_for_named_inputs_redoes_only_those(job):
    from cutout.jobs import manifest
    from cutout.jobs.errors import ConfigError
    from cutout.jobs.submit import retry_failed
    from cutout.workers.shard import process_shard

    result = submit(job)
    run_all_shards(result.job_prefix)
    job["redis"].delete(QUEUE)
    failed = sorted(r.input_uri for r in manifest.iter_records(result.job_prefix) if r.status == "failed")
    assert len(failed) == 2
    with pytest.raises(ConfigError, match="not failed inputs of this job: /nowhere.png"):
        retry_failed(result.job_id, inputs=(failed[0], "/nowhere.png"), redis_url=job["url"], broker_url=job["url"])
    assert job["redis"].llen(QUEUE) == 0  # refused before anything changed
    assert manifest.done_shard_ids(result.job_prefix) == set(manifest.all_shard_ids(result.job_prefix))

    retry = retry_failed(result.job_id, inputs=(failed[0],), redis_url=job["url"], broker_url=job["url"])
    assert (retry.items_to_retry, retry.shards_enqueued) == (1, 1)
    (kwargs,) = [message_kwargs(m) for m in job["redis"].lrange(QUEUE, 0, -1)]
    assert kwargs["inputs"] == [failed[0]] and kwargs["redo_failed"] is True
    process_shard(result.job_prefix, kwargs["shard_id"], worker_name="retry", redo_failed=True,
                  inputs=kwargs["inputs"])
    by_uri = {r.input_uri: r for r in manifest.iter_records(result.job_prefix)}
    assert by_uri[failed[0]].worker == "retry"
    assert all(r.worker == "test" for uri, r in by_uri.items() if uri != failed[0])


def test_cancelled_job_skips_its_shards(job):
    from cutout.jobs.submit import cancel_job, live_progress
    from cutout.workers.shard import process_shard

    result = submit(job)
    cancel_job(result.job_id, redis_url=job["url"])
    progress = live_progress(job["redis"], result.job_id)
    from cutout.jobs import manifest

    first = manifest.all_shard_ids(result.job_prefix)[0]
    run = process_shard(result.job_prefix, first, worker_name="test", progress=progress)
    assert run.stats is None and run.skipped_reason == "job cancelled"


def test_job_lookup_without_redis_needs_the_destination(job):
    from cutout.jobs.errors import NotFoundError
    from cutout.jobs.submit import find_job, resume_job

    result = submit(job)
    job["redis"].flushall()
    with pytest.raises(NotFoundError, match="--dest"):
        find_job(result.job_id, redis_url=job["url"])
    resumed = resume_job(result.job_id, destination=job["spec"].destination,
                         broker_url=job["url"], redis_url=job["url"])
    assert (resumed.shards_total, resumed.shards_enqueued) == (3, 3)
    assert job["redis"].llen(QUEUE) == 3


def test_cutout_submit_never_imports_torch(job):
    """The submitter path (CLI parsing, submit, sending by name) stays light."""
    spec = job["spec"]
    code = (
        "import sys\n"
        "from cutout.jobs.cli import main\n"
        f"rc = main(['submit', {spec.sources[0]!r}, '--to', {spec.destination!r}, '--model', 'threshold',"
        f" '--matting', 'none', '--broker', {job['url']!r}, '--redis', {job['url']!r}])\n"
        "heavy = [m for m in ('torch', 'torchvision', 'cv2', 'pymatting', 'cutout.workers.pipeline') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout
    assert len(out.stdout.split()[0]) == 16  # the job id comes first


WORKER_ONLY_MODULES = {"torch", "torchvision", "onnx", "onnxruntime", "cv2", "pymatting", "numba"}


def test_no_module_of_jobs_imports_a_worker_only_library():
    """Every import in jobs/, function-local ones included (the preflight's among them): the
    submitter half installs without torch, so no code path there may need it."""
    import ast

    found = []
    for path in sorted((REPO_ROOT / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno} {name}" for name in names
                      if name.split(".")[0] in WORKER_ONLY_MODULES]
    assert found == []
