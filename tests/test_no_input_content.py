"""No byte of an input reaches a record, a message or a log (issue 8, defect 11): a text file
full of secrets fails as "looks like text (N bytes)", through ``cutout run`` and a real job."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SECRET = "S3CRET"  # at the very start of a file: the old records quoted the first 8 bytes
SECRETS = {  # name → (content, what the record should say it looked like)
    "passwd.jpg": (f"{SECRET}-hunter2:x:0:0:root:/root:/bin/bash\n".encode() * 20, "looks like text"),
    "page.png": (f"<html><body>{SECRET}</body></html>".encode(), "looks like HTML"),
}


def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.full((40, 50, 3), 230, np.uint8)
    rgb[10:30, 10:30] = (20, 40, 200)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    (folder / "good.png").write_bytes(buffer.getvalue())
    for name, (content, _) in SECRETS.items():
        (folder / name).write_bytes(content)


def _check_failed_records(records: list[dict]) -> None:
    assert SECRET not in json.dumps(records)
    failed = {Path(r["input_uri"]).name: r for r in records if r["status"] == "failed"}
    assert set(failed) == set(SECRETS)
    for name, (content, kind) in SECRETS.items():
        assert failed[name]["error_class"] == "NotAnImageError"
        assert kind in failed[name]["error"] and f"{len(content):,} bytes" in failed[name]["error"]


def test_cutout_run_never_copies_input_content(tmp_path):
    source, out = tmp_path / "in", tmp_path / "out"
    _write_inputs(source)
    result = subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "run", str(source), "--out", str(out),
         "--model", "threshold", "--no-progress"],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 3, result.stderr
    lines = (out / "_cutout_run.jsonl").read_text().splitlines()
    _check_failed_records([json.loads(line) for line in lines])
    assert "failed" in result.stderr and SECRET not in result.stderr + result.stdout


def test_a_job_never_copies_input_content(tmp_path, redis_client, redis_url, caplog, monkeypatch):
    monkeypatch.setenv("CUTOUT_ALLOWED_SOURCES", tmp_path.as_uri() + "/")  # the worker may read them
    from cutout.jobs import manifest
    from cutout.jobs.spec import JobSpec, PipelineOptions
    from cutout.jobs.submit import submit_job
    from cutout.workers.shard import process_shard

    _write_inputs(tmp_path / "in")
    spec = JobSpec(sources=(str(tmp_path / "in"),), destination=(tmp_path / "out").as_uri(),
                   pipeline=PipelineOptions(model="threshold", matting="none"), shard_size=2)
    submitted = submit_job(spec, broker_url=redis_url, redis_url=redis_url)
    caplog.set_level(logging.DEBUG)
    for shard_id in manifest.all_shard_ids(submitted.job_prefix):
        process_shard(submitted.job_prefix, shard_id, worker_name="test")
    written = "".join(path.read_text(errors="replace")
                      for path in (tmp_path / "out").rglob("*") if path.suffix in (".jsonl", ".json"))
    assert SECRET not in written and SECRET not in caplog.text
    records = [json.loads(line) for path in (tmp_path / "out").rglob("records/*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(records) == 3
    _check_failed_records(records)
