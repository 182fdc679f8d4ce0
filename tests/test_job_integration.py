"""The distributed job end to end, on real services: redis-server, moto's S3 server (behind the
fault proxy) and real ``cutout worker`` processes (Celery, solo pool, one process each).

Workers are started once for the module and restarted when a test kills one. Visibility
timeout and the unacked sweep are short here so a killed worker's shard comes back in seconds.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import images as bad_images

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_ENV = {
    "CUTOUT_VISIBILITY_TIMEOUT": "8",
    "CUTOUT_UNACKED_RESTORE_INTERVAL": "1",
    "CUTOUT_UNACKED_RESTORE_THROTTLE": "1",
    "CUTOUT_HEARTBEAT_INTERVAL": "1",
    "CUTOUT_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    # moto's dev server now and then stalls one request; a short read timeout retries it fast
    "CUTOUT_STORAGE_READ_TIMEOUT": "10",
}
MAX_PIXELS = 1_000_000  # low, so one ordinary-looking input is refused as too large
JOB_TIMEOUT_S = 150


def pipeline_options(**overrides):
    from cutout.jobs.spec import PipelineOptions

    return PipelineOptions(model="threshold", matting="none", max_pixels=MAX_PIXELS, **overrides)


# --- the data set ------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def photo_variants(count: int, side: int = 72) -> dict[str, bytes]:
    """Crops of scikit-image's shipped photos, resized small: real textures, real subjects."""
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "coins",
             "moon", "colorwheel", "hubble_deep_field", "clock", "page"]
    out: dict[str, bytes] = {}
    index = 0
    while len(out) < count:
        name = names[index % len(names)]
        variant = index // len(names)
        photo = getattr(skimage.data, name)()
        if photo.ndim == 2:
            photo = np.dstack([photo] * 3)
        h, w = photo.shape[:2]
        top, left = (variant * 17) % max(1, h // 4), (variant * 29) % max(1, w // 4)
        crop = Image.fromarray(photo[top : top + 3 * h // 4, left : left + 3 * w // 4, :3])
        crop = crop.resize((side, int(side * crop.height / crop.width)))
        encoder = _jpeg if index % 2 else _png
        suffix = ".jpg" if index % 2 else ".png"
        out[f"photos/{name}_{variant}{suffix}"] = encoder(np.asarray(crop))
        index += 1
    return out


def generated_objects(count: int, side: int = 64, seed: int = 7) -> dict[str, bytes]:
    """A coloured disc or square on a plain, slightly noisy background: what `threshold` expects."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        background = rng.integers(180, 256, 3)
        image = np.empty((side, side, 3), np.uint8)
        image[:] = background
        image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
        yy, xx = np.mgrid[0:side, 0:side]
        cy, cx, r = rng.integers(side // 3, 2 * side // 3, 2).tolist() + [int(rng.integers(8, side // 3))]
        shape = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        image[shape] = rng.integers(0, 120, 3)
        out[f"generated/{i // 25:02d}/object_{i:03d}.png"] = _png(image)
    return out


def bad_inputs() -> dict[str, bytes]:
    """Eleven kinds of bad input, each under an image extension so the source keeps it."""
    too_large = np.zeros((1100, 1000, 3), np.uint8)  # 1.1 MP > MAX_PIXELS
    return {
        "bad/empty.jpg": bad_images.empty_bytes(),
        "bad/text.jpg": bad_images.text_file(),
        "bad/random.png": bad_images.random_bytes(),
        "bad/truncated_jpeg.jpg": bad_images.truncated_jpeg(),
        "bad/truncated_png.png": bad_images.truncated_png(),
        "bad/corrupt_idat.png": bad_images.corrupt_png_idat(),
        "bad/giant_header.png": bad_images.giant_png_header(),
        "bad/over_max_pixels.png": _png(too_large),
        "bad/icon_renamed.png": bad_images.ico_bytes(),
        "bad/html.jpg": b"<html><body>404 not found</body></html>",
        "bad/zeros.png": b"\x00" * 2048,
    }


def dataset(good: int = 100) -> tuple[dict[str, bytes], set[str]]:
    photos = photo_variants(good // 2)
    generated = generated_objects(good - len(photos))
    bad = bad_inputs()
    return {**photos, **generated, **bad}, set(bad)


# --- workers -----------------------------------------------------------------------------------
class WorkerFleet:
    """Real `cutout worker` processes (solo pool), each in its own session so kill -9 is exact."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}

    def start_one(self, pool: str = "solo", queues: str | None = None) -> subprocess.Popen:
        name = f"w{len(self.logs)}-{uuid.uuid4().hex[:6]}@%h"
        log_path = self.log_dir / f"worker-{len(self.logs)}.log"
        extra = ["--queues", queues] if queues else []
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cutout.jobs.cli", "worker", "--pool", pool, "--concurrency", "1",
                 "--hostname", name, "--loglevel", "INFO", *extra],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log_path
        return proc

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}:\n{self.log(proc)}")
            if " ready." in self.log(proc):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s:\n{self.log(proc)}")

    def ensure(self, count: int) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]
        started = [self.start_one() for _ in range(count - len(self.procs))]
        for proc in started:
            self.wait_ready(proc)

    def log(self, proc: subprocess.Popen) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def all_logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}" for path in self.logs.values())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="module")
def services(redis_server, s3_server, _fault_proxy_server):
    """Env for the submitter (this process) and the workers (S3 through the fault proxy)."""
    return {
        "redis_url": redis_server.url,
        "s3_endpoint": s3_server.endpoint,
        "proxy": _fault_proxy_server,
    }


@pytest.fixture(scope="module")
def fleet(services, tmp_path_factory):
    env = {
        **os.environ,
        **WORKER_ENV,
        "CUTOUT_BROKER_URL": services["redis_url"],
        "CUTOUT_REDIS_URL": services["redis_url"],
        "AWS_ENDPOINT_URL": services["proxy"].url,
        # workers refuse local inputs unless listed (cutout.jobs.allowlist): this run's temp folders
        "CUTOUT_ALLOWED_SOURCES": f"s3://,{tmp_path_factory.getbasetemp().resolve().as_uri()}/",
    }
    os.environ["CUTOUT_BROKER_URL"] = services["redis_url"]
    os.environ.setdefault("CUTOUT_STORAGE_READ_TIMEOUT", WORKER_ENV["CUTOUT_STORAGE_READ_TIMEOUT"])
    fleet = WorkerFleet(env, tmp_path_factory.mktemp("worker-logs"))
    fleet.ensure(2)
    yield fleet
    fleet.stop()


# --- helpers -----------------------------------------------------------------------------------
def new_bucket(prefix: str) -> str:
    from cutout.jobs.storage import s3_client

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


def upload(bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    from cutout.jobs.storage import s3_client

    client = s3_client()
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}{key}", Body=data)


def make_spec(sources, destination, **pipeline_overrides):
    from cutout.jobs.spec import JobSpec

    return JobSpec(sources=tuple(sources), destination=destination,
                   pipeline=pipeline_options(**pipeline_overrides), shard_size=8)


def submit(spec, redis_url):
    from cutout.jobs.submit import submit_job

    return submit_job(spec, broker_url=redis_url, redis_url=redis_url)


def shards_done(prefix: str) -> int:
    from cutout.jobs import manifest

    return sum(1 for _ in manifest.done_shard_ids(prefix))


def wait_for_job(prefix: str, shards_total: int, fleet: WorkerFleet, timeout: float = JOB_TIMEOUT_S) -> None:
    """Every shard done and every manifest part written, by the workers that finished each
    group's last shard: a job's end as a user sees it."""
    from cutout.jobs import manifest_parts

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if shards_done(prefix) >= shards_total and manifest_parts.all_current(prefix):
            return
        time.sleep(0.5)
    pytest.fail(f"job did not finish: {shards_done(prefix)}/{shards_total} shards\n{fleet.all_logs()}")


def read_manifest(prefix: str) -> list[dict]:
    """Every row of the manifest's parts, read as one Parquet dataset (what a user does)."""
    import pyarrow.dataset as ds

    from cutout.jobs import manifest_parts, storage

    folder = storage.join_uri(prefix, "manifest")
    if folder.startswith("s3://"):
        return list(manifest_parts.iter_rows(prefix))
    table = ds.dataset(storage._local_path(folder), format="parquet").to_table()
    return [manifest_parts.plain_row(row) for row in table.to_pylist()]


def assert_exactly_once(records: list[dict], expected_inputs: set[str]) -> None:
    inputs = [r["input_uri"] for r in records]
    duplicates = {u for u in inputs if inputs.count(u) > 1}
    assert not duplicates, f"inputs recorded more than once: {sorted(duplicates)[:5]}"
    assert set(inputs) == expected_inputs, (
        f"lost: {sorted(expected_inputs - set(inputs))[:5]}, unexpected: {sorted(set(inputs) - expected_inputs)[:5]}"
    )


def decode_rgba(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")).astype(np.int16)


# --- the tests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_bucket_job(fleet, services):
    """A bucket-to-bucket job of 100 good and 11 bad inputs, run to the end by two workers."""
    files, bad = dataset(100)
    source_bucket, dest_bucket = new_bucket("src"), new_bucket("dst")
    upload(source_bucket, "in/", files)
    spec = make_spec([f"s3://{source_bucket}/in/"], f"s3://{dest_bucket}/out")
    result = submit(spec, services["redis_url"])
    assert result.items_total == len(files)
    wait_for_job(result.job_prefix, result.shards_total, fleet)
    return {"spec": spec, "result": result, "files": files, "bad": bad,
            "source": f"s3://{source_bucket}/in/", "dest_bucket": dest_bucket}


def test_bucket_to_bucket_job_accounts_for_every_input(finished_bucket_job):
    from cutout.jobs import storage
    from cutout.workers.pipeline import Pipeline, PipelineInput

    job = finished_bucket_job
    records = read_manifest(job["result"].job_prefix)
    expected = {job["source"] + key for key in job["files"]}
    assert_exactly_once(records, expected)
    by_uri = {r["input_uri"]: r for r in records}
    for key in job["bad"]:
        record = by_uri[job["source"] + key]
        assert record["status"] == "failed", key
        assert record["error_class"] and record["error"] and record["stage"], record
        assert record["output_uris"] == []
    for key in ("bad/giant_header.png", "bad/over_max_pixels.png"):
        assert by_uri[job["source"] + key]["error_class"] == "ImageTooLargeError"
    good = [key for key in job["files"] if key not in job["bad"]]
    assert all(by_uri[job["source"] + k]["status"] == "done" for k in good)

    local = Pipeline(job["spec"].pipeline)
    sample = good[::7]
    outcomes = local.run([PipelineInput(job["source"] + k, job["files"][k]) for k in sample])
    for key, outcome in zip(sample, outcomes):
        record = by_uri[job["source"] + key]
        assert record["output_uris"] == [f"s3://{job['dest_bucket']}/out/{Path(key).with_suffix('.png')}"]
        assert record["model"] == "threshold" and record["config_hash"] == job["spec"].pipeline.config_hash()
        remote = decode_rgba(storage.read_bytes(record["output_uris"][0]))
        assert outcome.ok, outcome.error
        expected_pixels = decode_rgba(outcome.data)
        assert remote.shape == expected_pixels.shape
        assert np.abs(remote - expected_pixels).max() <= 1, key


def test_resubmitting_a_finished_job_does_no_work(finished_bucket_job, services, fleet):
    from cutout.jobs.storage import s3_client

    job = finished_bucket_job
    client = s3_client()

    def stamps() -> dict[str, object]:
        listing = client.list_objects_v2(Bucket=job["dest_bucket"], Prefix="out/")
        return {o["Key"]: (o["LastModified"], o["ETag"]) for o in listing.get("Contents", [])}

    before = stamps()
    again = submit(job["spec"], services["redis_url"])
    assert again.job_id == job["result"].job_id
    assert again.shards_enqueued == 0
    assert again.shards_already_done == job["result"].shards_total
    time.sleep(2)
    assert stamps() == before


def test_retry_failed_after_fixing_an_input_reprocesses_only_that_input(finished_bucket_job, services, fleet):
    from cutout.jobs.storage import s3_client
    from cutout.jobs.submit import retry_failed

    job = finished_bucket_job
    prefix = job["result"].job_prefix
    client = s3_client()

    def outputs() -> dict[str, object]:
        listing = client.list_objects_v2(Bucket=job["dest_bucket"], Prefix="out/photos/")["Contents"]
        return {o["Key"]: o["LastModified"] for o in listing}

    good_outputs = outputs()
    failed_before = {r["input_uri"]: r for r in read_manifest(prefix) if r["status"] == "failed"}
    fixed_key = "bad/truncated_jpeg.jpg"
    fixed_uri = job["source"] + fixed_key
    fixed_image = generated_objects(1, seed=99)["generated/00/object_000.png"]
    source_bucket = job["source"].split("/")[2]
    client.put_object(Bucket=source_bucket, Key=f"in/{fixed_key}", Body=_jpeg(np.asarray(Image.open(io.BytesIO(fixed_image)))))
    urls = {"redis_url": services["redis_url"], "broker_url": services["redis_url"]}

    nothing = retry_failed(job["result"].job_id, error_class="NoSuchErrorClass", **urls)
    assert nothing.shards_enqueued == 0
    result = retry_failed(job["result"].job_id, inputs=(fixed_uri,), **urls)
    assert (result.items_to_retry, result.shards_enqueued) == (1, 1)
    wait_for_job(prefix, job["result"].shards_total, fleet)

    records = read_manifest(prefix)
    assert_exactly_once(records, {job["source"] + key for key in job["files"]})
    by_uri = {r["input_uri"]: r for r in records}
    assert by_uri[fixed_uri]["status"] == "done"
    assert client.head_object(Bucket=job["dest_bucket"], Key="out/bad/truncated_jpeg.png")
    for uri, before in failed_before.items():  # the other failures were not run again
        if uri != fixed_uri:
            assert by_uri[uri] == before, uri
    assert outputs() == good_outputs, "good outputs were rewritten by retry-failed"

    everything = retry_failed(job["result"].job_id, **urls)  # all remaining failures, once more
    assert everything.items_to_retry == len(job["bad"]) - 1
    wait_for_job(prefix, job["result"].shards_total, fleet)
    records = read_manifest(prefix)
    assert_exactly_once(records, {job["source"] + key for key in job["files"]})
    by_uri = {r["input_uri"]: r for r in records}
    assert all(by_uri[job["source"] + k]["status"] == "failed" for k in job["bad"] if k != fixed_key)
    assert by_uri[fixed_uri]["status"] == "done" and outputs() == good_outputs


_TASK_EVENT = re.compile(r"cutout\.process_shard\[([0-9a-f-]+)\] (received|succeeded)")


def _received_tasks(log: str) -> list[str]:
    return [m.group(1) for m in _TASK_EVENT.finditer(log) if m.group(2) == "received"]


def _succeeded_tasks(log: str) -> set[str]:
    return {m.group(1) for m in _TASK_EVENT.finditer(log) if m.group(2) == "succeeded"}


def test_kill_minus_nine_mid_job_loses_and_duplicates_nothing(fleet, services, bucket):
    # Shards of 6 images at 640 px take about a second each, so the kill lands mid-shard
    # rather than in the few milliseconds between a shard's end and its log line.
    files = generated_objects(48, side=640, seed=11)
    source_bucket, dest_bucket = bucket("src"), bucket("dst")
    upload(source_bucket, "in/", files)
    spec = make_spec([f"s3://{source_bucket}/in/"], f"s3://{dest_bucket}/out")
    spec = spec.model_copy(update={"shard_size": 6})
    result = submit(spec, services["redis_url"])
    victim = fleet.procs[0]
    deadline = time.monotonic() + 60
    in_flight: list[str] = []
    while time.monotonic() < deadline and not in_flight:
        log = fleet.log(victim)
        received = _received_tasks(log)
        in_flight = [t for t in received if t not in _succeeded_tasks(log)] if len(received) >= 2 else []
        time.sleep(0.02)
    assert in_flight, f"the victim never held a shard:\n{fleet.all_logs()}"
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=10)
    in_flight = [t for t in in_flight if t not in _succeeded_tasks(fleet.log(victim))]
    assert in_flight, "the victim finished its shard just before the kill; nothing to redeliver"

    wait_for_job(result.job_prefix, result.shards_total, fleet)
    survivor_logs = "".join(fleet.log(p) for p in fleet.procs if p is not victim)
    assert set(in_flight) & set(_received_tasks(survivor_logs)), "the killed worker's shard was not redelivered"
    records = read_manifest(result.job_prefix)
    assert_exactly_once(records, {f"s3://{source_bucket}/in/{k}" for k in files})
    assert all(r["status"] == "done" for r in records)
    fleet.ensure(2)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (a prefork worker's pool children), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def test_prefork_child_killed_mid_shard_is_redelivered_at_once(fleet, services, bucket):
    """The production pool: the OOM killer takes a pool child, not the whole worker. With
    acks_late + reject_on_worker_lost the parent requeues the shard at once (no visibility
    timeout wait) and a fresh child redoes it."""
    files = generated_objects(24, side=640, seed=5)
    source_bucket, dest_bucket = bucket("src"), bucket("dst")
    upload(source_bucket, "in/", files)
    spec = make_spec([f"s3://{source_bucket}/in/"], f"s3://{dest_bucket}/out")
    spec = spec.model_copy(update={"shard_size": 6, "queue": "cutout-prefork-test"})
    parent = fleet.start_one(pool="prefork", queues="cutout-prefork-test")
    try:
        fleet.wait_ready(parent)
        result = submit(spec, services["redis_url"])
        deadline = time.monotonic() + 60
        in_flight: list[str] = []
        while time.monotonic() < deadline and not in_flight:
            log = fleet.log(parent)
            in_flight = [t for t in _received_tasks(log) if t not in _succeeded_tasks(log)]
            time.sleep(0.02)
        assert in_flight, f"the prefork worker never held a shard:\n{fleet.log(parent)}"
        (child,) = _children(parent.pid)
        os.kill(child, signal.SIGKILL)
        wait_for_job(result.job_prefix, result.shards_total, fleet)
        log = fleet.log(parent)
        assert "exited with 'signal 9 (SIGKILL)'" in log
        assert _received_tasks(log).count(in_flight[0]) >= 2, "the killed child's shard was not redelivered"
        for _ in range(100):  # Celery logs the success a moment after the shard's files are written
            if in_flight[0] in _succeeded_tasks(fleet.log(parent)):
                break
            time.sleep(0.1)
        assert in_flight[0] in _succeeded_tasks(fleet.log(parent))
        records = read_manifest(result.job_prefix)
        assert_exactly_once(records, {f"s3://{source_bucket}/in/{k}" for k in files})
        assert all(r["status"] == "done" for r in records)
    finally:
        parent.terminate()
        parent.wait(timeout=30)
        fleet.procs.remove(parent)


def _noise_png(side: int, seed: int) -> bytes:
    """Incompressible pixels: slow enough to encode that the input stays on the model a while."""
    return _png(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


class PoisonKiller(threading.Thread):
    """Stands in for a decoder segfault or the OOM killer: SIGKILLs the worker process whose
    in-flight mark (Redis) holds an input named ``poison``, once per process."""

    def __init__(self, redis_url: str, job_id: str):
        super().__init__(daemon=True)
        import redis

        self.redis = redis.Redis.from_url(redis_url)
        self.key = f"cutout:job:{job_id}:inflight"
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.002):
            for raw in self.redis.hvals(self.key):
                entry = json.loads(raw)
                pid = int(entry["worker"].rsplit(":", 1)[1])
                if any("poison" in uri for uri in entry["uris"]) and pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)


def test_an_input_that_kills_its_worker_is_recorded_and_its_neighbours_finish(fleet, services, bucket):
    """Without isolation such an input would take its shard down on every redelivery, forever."""
    files = generated_objects(11, side=64, seed=13)
    files["generated/00/poison.png"] = _noise_png(900, seed=1)
    source_bucket, dest_bucket = bucket("src"), bucket("dst")
    upload(source_bucket, "in/", files)
    spec = make_spec([f"s3://{source_bucket}/in/"], f"s3://{dest_bucket}/out")
    spec = spec.model_copy(update={"shard_size": 6, "queue": "cutout-poison-test"})
    parent = fleet.start_one(pool="prefork", queues="cutout-poison-test")
    killer = None
    try:
        fleet.wait_ready(parent)
        result = submit(spec, services["redis_url"])
        killer = PoisonKiller(services["redis_url"], result.job_id)
        killer.start()
        wait_for_job(result.job_prefix, result.shards_total, fleet)
        # died once in a batch (its neighbours then ran alone), twice alone: then recorded
        assert len(killer.killed) == 3, f"kills: {killer.killed}\n{fleet.log(parent)}"
        records = read_manifest(result.job_prefix)
        assert_exactly_once(records, {f"s3://{source_bucket}/in/{k}" for k in files})
        by_key = {r["input_uri"].split("/in/", 1)[1]: r for r in records}
        poison = by_key.pop("generated/00/poison.png")
        assert (poison["status"], poison["error_class"], poison["stage"]) == ("failed", "WorkerCrashError", "pipeline")
        assert poison["output_uris"] == [] and "died 2 times" in poison["error"]
        assert all(r["status"] == "done" for r in by_key.values()), by_key
    finally:
        if killer is not None:
            killer.stop.set()
        parent.terminate()
        parent.wait(timeout=30)
        fleet.procs.remove(parent)


def test_resume_after_redis_flushall_finishes_from_durable_records(fleet, services, bucket):
    import redis

    files = generated_objects(60, side=256, seed=21)
    source_bucket, dest_bucket = bucket("src"), bucket("dst")
    upload(source_bucket, "in/", files)
    spec = make_spec([f"s3://{source_bucket}/in/"], f"s3://{dest_bucket}/out")
    spec = spec.model_copy(update={"shard_size": 3})
    result = submit(spec, services["redis_url"])
    deadline = time.monotonic() + 60
    while shards_done(result.job_prefix) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    redis.Redis.from_url(services["redis_url"]).flushall()
    done_at_flush = shards_done(result.job_prefix)
    assert done_at_flush < result.shards_total, "the job finished before Redis could be flushed"

    env = {**os.environ, "CUTOUT_BROKER_URL": services["redis_url"], "CUTOUT_REDIS_URL": services["redis_url"]}
    resumed = subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "resume", result.job_id, "--dest", spec.destination],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    wait_for_job(result.job_prefix, result.shards_total, fleet)
    records = read_manifest(result.job_prefix)
    assert_exactly_once(records, {f"s3://{source_bucket}/in/{k}" for k in files})
    assert all(r["status"] == "done" for r in records)

    report = subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "report", result.job_id, "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["complete"] and summary["counts"]["done"] == len(files)


def test_injected_s3_errors_are_retried_and_the_job_completes(fleet, services, bucket):
    files = generated_objects(40, seed=31)
    source_bucket, dest_bucket = bucket("src"), bucket("dst")
    upload(source_bucket, "in/", files)
    spec = make_spec([f"s3://{source_bucket}/in/"], f"s3://{dest_bucket}/out")
    proxy = services["proxy"]  # workers reach S3 through it; this process talks to moto directly
    proxy.reset()
    proxy.fail_for(6.0)  # every worker S3 call answers 503 SlowDown for six seconds
    try:
        result = submit(spec, services["redis_url"])
        wait_for_job(result.job_prefix, result.shards_total, fleet)
        failed_requests = proxy.requests_failed
    finally:
        proxy.reset()
    assert failed_requests > 0
    records = read_manifest(result.job_prefix)
    assert_exactly_once(records, {f"s3://{source_bucket}/in/{k}" for k in files})
    assert all(r["status"] == "done" for r in records), [r["error"] for r in records if r["status"] != "done"][:3]


def test_local_file_job_through_the_cli(fleet, services, tmp_path):
    files, bad = dataset(20)
    source, dest = tmp_path / "in", tmp_path / "out"
    for key, data in files.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    env = {**os.environ, "CUTOUT_BROKER_URL": services["redis_url"], "CUTOUT_REDIS_URL": services["redis_url"]}
    submitted = subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "submit", source.as_uri() + "/", "--to", dest.as_uri(),
         "--model", "threshold", "--matting", "none", "--max-pixels", str(MAX_PIXELS), "--shard-size", "6"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[0]
    from cutout.jobs import manifest
    from cutout.jobs.sharding import job_prefix

    prefix = job_prefix(dest.as_uri(), job_id)
    wait_for_job(prefix, manifest.load_totals(prefix)[1], fleet)
    status = subprocess.run([sys.executable, "-m", "cutout.jobs.cli", "status", job_id], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 3, status.stderr  # finished, some inputs failed (README, "Exit codes")
    assert f"{len(files)}/{len(files)} inputs" in status.stdout
    records = [{**r, "input_uri": as_path(r["input_uri"])} for r in read_manifest(prefix)]
    assert_exactly_once(records, {str(source / key) for key in files})
    for record in records:
        key = Path(record["input_uri"]).relative_to(source)
        if str(key) in bad:
            assert record["status"] == "failed"
        else:
            assert record["status"] == "done"
            output = dest / key.with_suffix(".png")
            assert [as_path(u) for u in record["output_uris"]] == [str(output)]
            assert Image.open(output).mode == "RGBA"


def as_path(uri: str) -> str:
    """Local records may hold plain paths or file:// URIs: compare them as paths."""
    return uri[len("file://"):] if uri.startswith("file://") else uri
