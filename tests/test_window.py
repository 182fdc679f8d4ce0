"""The bounded window of shard messages (cutout.jobs.window), on a real redis-server.

- submit sends only the first ``CUTOUT_QUEUE_WINDOW`` shards; each shard that leaves the queue
  lets exactly one more in, in shard order, none twice, none skipped, even with many senders;
- a cancelled job sends nothing more; a sender that died between taking and sending is rescued;
- resume rebuilds the window from the done-markers after Redis lost everything;
- with real ``cutout worker`` processes, a window of 2 over 10 shards survives a FLUSHALL with a
  resume mid-job and a SIGKILLed worker: every input exactly once, every output written once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_liveness import REPO_ROOT, noise_folder, records, start_worker, stop, wait_done, wait_ready, worker_env

QUEUE = "cutout-window-test"


def queued_shards(client, queue: str = QUEUE) -> list[str]:
    return [_kwargs(m)["shard_id"] for m in client.lrange(queue, 0, -1)]


def _kwargs(message: bytes) -> dict:
    import base64

    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    return body[1]


def make_job(tmp_path: Path, count: int, shard_size: int, **update):
    from cutout.jobs.spec import JobSpec, PipelineOptions

    source = tmp_path / "in"
    noise_folder(source, count, side=24)
    return JobSpec(sources=(source.as_uri() + "/",), destination=(tmp_path / "out").as_uri(),
                   pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=shard_size,
                   queue=QUEUE, **update)


def submit(spec, url):
    from cutout.jobs.submit import submit_job

    return submit_job(spec, broker_url=url, redis_url=url)


def test_submit_sends_only_the_window_and_each_finished_shard_lets_one_more_in(
        tmp_path, redis_client, redis_url, monkeypatch):
    from cutout.jobs.queue import submitter_app
    from cutout.jobs.window import shard_left_queue

    monkeypatch.setenv("CUTOUT_QUEUE_WINDOW", "3")
    result = submit(make_job(tmp_path, 20, 2), redis_url)  # 10 shards
    assert (result.shards_total, result.shards_enqueued) == (10, 3)
    assert queued_shards(redis_client) == ["s000000", "s000001", "s000002"][::-1]  # LPUSH: newest first
    app = submitter_app(redis_url)
    sent = shard_left_queue(redis_client, app, result.job_id, "s000001")
    assert sent == 1 and queued_shards(redis_client)[0] == "s000003"
    assert shard_left_queue(redis_client, app, result.job_id, "s000001") == 0  # a duplicate frees nothing
    assert redis_client.llen(QUEUE) == 4  # three sent at submit + one


def test_many_senders_take_every_shard_once_in_order(tmp_path, redis_client, redis_url, monkeypatch):
    from cutout.jobs.window import ShardWindow

    window = ShardWindow(redis_client, "0123456789abcdef")
    window.reset(prefix="file:///x/_cutout/jobs/0123456789abcdef", queue=QUEUE, next_index=0, end=500, limit=7)
    taken: list[int] = []
    lock = threading.Lock()

    def sender() -> None:
        own = ShardWindow(redis_client.__class__.from_url(redis_url), window.job_id)
        while True:
            numbers = own.claim()
            own.confirm(numbers)
            with lock:
                taken.extend(numbers)
            state = own.state()
            assert state.pending + state.sending <= 7
            if not numbers and state.next >= 500 and state.pending == 0:
                return
            for number in numbers:  # each shard finishes and leaves the queue
                own.finished(f"s{number:06d}")

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == list(range(500))


def test_a_cancelled_job_sends_nothing_more_and_a_dead_sender_is_rescued(redis_client):
    from cutout.jobs.progress import LiveProgress
    from cutout.jobs.window import ShardWindow

    window = ShardWindow(redis_client, "00000000000000aa")
    window.reset(prefix="file:///x/_cutout/jobs/00000000000000aa", queue=QUEUE, next_index=0, end=10, limit=2)
    assert window.claim() == [0, 1]  # a sender takes two shards, then dies before sending them
    assert window.rescue(stale_s=60) == []  # not yet stale
    assert window.rescue(stale_s=0) == [0, 1]
    assert window.rescue(stale_s=60) == []  # re-stamped: one reaper sends them, once
    window.confirm([0, 1])
    LiveProgress(redis_client, window.job_id).cancel()
    window.finished("s000000")
    assert window.claim() == []
    redis_client.delete(f"cutout:job:{window.job_id}:cancel")
    assert window.claim() == [2]


def test_cancel_stops_the_flow_and_resume_or_the_reaper_starts_it_again(tmp_path, redis_client, redis_url, monkeypatch):
    from cutout.jobs.queue import submitter_app
    from cutout.jobs.submit import cancel_job, resume_job
    from cutout.jobs.window import ShardWindow, reap_windows, shard_left_queue

    monkeypatch.setenv("CUTOUT_QUEUE_WINDOW", "2")
    result = submit(make_job(tmp_path, 5, 1), redis_url)  # 5 shards, 2 sent
    app = submitter_app(redis_url)
    cancel_job(result.job_id, redis_url=redis_url)
    redis_client.delete(QUEUE)  # the workers took both messages and skipped them (cancelled)
    for shard_id in ("s000000", "s000001"):
        assert shard_left_queue(redis_client, app, result.job_id, shard_id) == 0
    assert reap_windows(redis_client, app, stale_s=60) == 0 and redis_client.llen(QUEUE) == 0
    resumed = resume_job(result.job_id, broker_url=redis_url, redis_url=redis_url)
    assert resumed.shards_enqueued == 2 and sorted(queued_shards(redis_client)) == ["s000000", "s000001"]
    ShardWindow(redis_client, result.job_id).finished("s000000")  # a top-up lost with its worker
    assert reap_windows(redis_client, app, stale_s=60) == 1  # the reaper lets the next shard in
    assert queued_shards(redis_client)[0] == "s000002"


def test_resume_rebuilds_the_window_from_done_markers_after_flushall(tmp_path, redis_client, redis_url, monkeypatch):
    from cutout.jobs import manifest
    from cutout.jobs.submit import resume_job
    from cutout.jobs.window import ShardWindow
    from cutout.workers.shard import process_shard

    monkeypatch.setenv("CUTOUT_QUEUE_WINDOW", "2")
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", f"{(tmp_path / 'in').as_uri()}/")
    result = submit(make_job(tmp_path, 10, 1), redis_url)  # 10 shards
    for shard_id in ("s000000", "s000002", "s000003"):
        process_shard(result.job_prefix, shard_id, worker_name="test")
    redis_client.flushall()
    resumed = resume_job(result.job_id, destination=(tmp_path / "out").as_uri(),
                         broker_url=redis_url, redis_url=redis_url)
    assert (resumed.shards_enqueued, resumed.shards_already_done) == (2, 3)
    assert sorted(queued_shards(redis_client)) == ["s000001", "s000004"]  # the first two not done
    state = ShardWindow(redis_client, result.job_id).state()
    assert (state.next, state.end, state.pending) == (5, 10, 2)
    assert len(manifest.done_shard_ids(result.job_prefix)) == 3


@pytest.mark.integration
def test_window_of_two_over_ten_shards_survives_flushall_resume_and_a_killed_worker(
        tmp_path, redis_client, redis_url, monkeypatch):
    import signal

    from cutout.jobs import manifest

    source = tmp_path / "in"
    noise_folder(source, 30, side=400)
    monkeypatch.setenv("CUTOUT_QUEUE_WINDOW", "2")
    extra = {"CUTOUT_QUEUE_WINDOW": "2", "CUTOUT_WORKER_STALE_S": "6", "CUTOUT_REAP_INTERVAL": "1",
             "CUTOUT_HEARTBEAT_INTERVAL": "1", "CUTOUT_QUEUES": QUEUE}
    env = worker_env(redis_url, **extra)
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    workers = [start_worker(env, logs[0]), start_worker(env, logs[1])]
    try:
        for proc, log in zip(workers, logs):
            wait_ready(proc, log)
        from cutout.jobs.spec import JobSpec, PipelineOptions

        spec = JobSpec(sources=(source.as_uri() + "/",), destination=(tmp_path / "out").as_uri(),
                       pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=3, queue=QUEUE)
        result = submit(spec, redis_url)
        assert (result.shards_total, result.shards_enqueued) == (10, 2)
        deadline = time.monotonic() + 90
        while len(manifest.done_shard_ids(result.job_prefix)) < 3 and time.monotonic() < deadline:
            assert redis_client.llen(QUEUE) <= 2  # never more than the window waits in the broker
            time.sleep(0.05)
        redis_client.flushall()  # Redis loses the queue, the window and the live progress
        done_at_flush = len(manifest.done_shard_ids(result.job_prefix))
        assert done_at_flush < 10, "the job finished before Redis could be flushed"

        resumed = subprocess.run(
            [sys.executable, "-m", "cutout.jobs.cli", "resume", result.job_id, "--dest", spec.destination],
            cwd=REPO_ROOT, env={**os.environ, **extra, "CUTOUT_BROKER_URL": redis_url,
                                "CUTOUT_REDIS_URL": redis_url},
            capture_output=True, text=True, timeout=120,
        )
        assert resumed.returncode == 0, resumed.stderr
        started_key = f"cutout:job:{result.job_id}:started"
        by_pid = {str(proc.pid): proc for proc in workers}
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            for entry in redis_client.hvals(started_key):  # shard -> "worker time"
                victim = victim or by_pid.get(entry.decode().split()[0].rsplit(":", 1)[-1])
            time.sleep(0.01)
        assert victim is not None, "no worker held a shard after the resume"
        os.killpg(victim.pid, signal.SIGKILL)  # a dead machine, holding a shard of the window
        victim.wait(timeout=10)
        workers.append(start_worker(env, logs[2]))
        wait_done(result.job_prefix, 10, 180, logs)
    finally:
        stop(workers)
    rows = records(result.job_prefix)
    inputs = [row["input_uri"] for row in rows]
    assert sorted(inputs) == sorted(str(p) for p in source.iterdir())
    assert len(set(inputs)) == 30 and all(row["status"] == "done" for row in rows)
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != "_cutout")
    assert len(outputs) == 30


def test_incremental_submit_rebuilds_a_lost_window_and_extends_a_live_one(tmp_path, redis_client, redis_url, monkeypatch):
    from PIL import Image

    from cutout.jobs.queue import submitter_app
    from cutout.jobs.submit import submit_incremental
    from cutout.jobs.window import ShardWindow, shard_left_queue
    from cutout.workers.shard import process_shard

    monkeypatch.setenv("CUTOUT_QUEUE_WINDOW", "2")
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", f"{(tmp_path / 'in').as_uri()}/")
    spec = make_job(tmp_path, 4, 1)
    result = submit(spec, redis_url)
    for number in range(4):
        process_shard(result.job_prefix, f"s{number:06d}", worker_name="test")

    def grow(*names: str) -> None:
        for name in names:
            Image.new("RGB", (24, 24), "red").save(tmp_path / "in" / name)

    redis_client.flushall()  # the window is lost with everything else
    grow("new_a.png", "new_b.png", "new_c.png")
    extended = submit_incremental(spec, broker_url=redis_url, redis_url=redis_url)
    assert (extended.items_new, extended.shards_total, extended.shards_enqueued) == (3, 7, 2)
    assert sorted(queued_shards(redis_client)) == ["s000004", "s000005"]  # done shards are not sent
    window = ShardWindow(redis_client, result.job_id)
    assert (window.state().next, window.state().end) == (6, 7)

    grow("new_d.png")
    again = submit_incremental(spec, broker_url=redis_url, redis_url=redis_url)
    assert (again.items_new, again.shards_total, again.shards_enqueued) == (1, 8, 0)  # the window is full
    assert window.state().end == 8
    assert shard_left_queue(redis_client, submitter_app(redis_url), result.job_id, "s000004") == 1
    assert queued_shards(redis_client)[0] == "s000006"
