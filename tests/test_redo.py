"""``cutout redo JOB --flag NAME`` with other pipeline options, run by a real worker on a real
redis-server. The original job's destination (records with quality flags) is written with the
real manifest writers, since flags are filled in by the pipeline on another branch."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cutout.jobs import manifest, sharding, storage
from tests.test_incremental import worker  # noqa: F401  (the module's real worker)
from tests.test_job_integration import REPO_ROOT
from tests.test_report_html import build_job

pytestmark = pytest.mark.integration

REDO_OPTIONS = ["--model", "threshold", "--matting", "none", "--background", "color:#00ff00"]


def _manifest_rows(prefix: str) -> list[dict]:
    """The job's manifest parts, read as one dataset with duckdb (a local destination)."""
    import duckdb

    folder = storage.join_uri(prefix, "manifest")
    relation = duckdb.sql(f"SELECT input_uri, job_id, config_hash, status, output_uris, flags "
                          f"FROM read_parquet('{folder}/*.parquet')")
    return [dict(zip(relation.columns, values)) for values in relation.fetchall()]


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutout.jobs.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_redo_flagged_outputs_with_other_options(worker, redis_server, tmp_path):  # noqa: F811
    prefix, job_id = build_job(tmp_path)
    dest = manifest.load_spec(prefix).destination
    flagged = {r.input_uri: r for r in manifest.iter_records(prefix) if "empty_alpha" in r.flags}
    assert len(flagged) == 3
    env = {**os.environ, "CUTOUT_BROKER_URL": redis_server.url, "CUTOUT_REDIS_URL": redis_server.url}

    redo = _cli("redo", job_id, "--dest", dest, "--flag", "empty_alpha", *REDO_OPTIONS, env=env)
    assert redo.returncode == 0, redo.stderr
    redo_id = redo.stdout.split()[0]
    assert redo_id != job_id and "3 inputs in 1 shards enqueued" in redo.stderr, redo.stderr
    redo_pipeline = manifest.load_spec(sharding.job_prefix(dest, redo_id)).pipeline
    assert (redo_pipeline.model, redo_pipeline.matting, redo_pipeline.background) == (
        "threshold", "none", "color:#00ff00")  # the options given; the rest kept from the job
    new_config = redo_pipeline.config_hash()

    # The worker that finishes the redo's last shard refreshes the ORIGINAL job's manifest part.
    deadline, rows = time.monotonic() + 90, []
    while time.monotonic() < deadline:
        if storage.exists(storage.join_uri(prefix, "manifest", "part-00000000.parquet")):
            rows = _manifest_rows(prefix)
            if sum(r["job_id"] == redo_id for r in rows) == 3:
                break
        time.sleep(0.3)
    else:
        pytest.fail(f"the original manifest was not refreshed: {rows[:2]}\n{worker.all_logs()}")
    inputs = [r["input_uri"] for r in rows]
    assert len(inputs) == len(set(inputs)) == 24  # one record per input
    for row in rows:
        if row["input_uri"] in flagged:
            assert row["job_id"] == redo_id and row["config_hash"] == new_config, row
            assert row["status"] == "done" and list(row["output_uris"]) == flagged[row["input_uri"]].output_uris
        else:
            assert row["job_id"] == job_id and row["config_hash"] != new_config

    # The report page shows each output's latest record: the redone ones are no longer listed
    # under empty_alpha, and the page does not suggest the same redo again.
    from cutout.jobs import report_html

    page = report_html.render(report_html.gather(prefix, job_id))
    flags_now = sum("empty_alpha" in (r["flags"] or ()) for r in rows)  # the latest records' flags
    if flags_now:
        assert f"<code>empty_alpha</code> × {flags_now} " in page
    else:
        assert "--flag empty_alpha" not in page
    for uri in flagged:  # the new output replaced the old one at the same key: opaque green corner
        output = Image.open(io.BytesIO(storage.read_bytes(flagged[uri].output_uris[0]))).convert("RGBA")
        assert tuple(np.asarray(output)[0, 0]) == (0, 255, 0, 255)

    # The same redo again is the same job (resumed, nothing to do); an unknown flag is refused.
    again = _cli("redo", job_id, "--dest", dest, "--flag", "empty_alpha", *REDO_OPTIONS, env=env)
    bad = _cli("redo", job_id, "--dest", dest, "--flag", "blurry", env=env)
    assert bad.returncode == 2 and "unknown quality flag" in bad.stderr  # a usage error
    if again.returncode == 0:  # after a redo the inputs may no longer be flagged at all
        assert again.stdout.split()[0] != job_id
    else:
        assert "no done output of this job carries empty_alpha" in again.stderr, again.stderr


def test_status_and_report_count_flags(tmp_path):
    prefix, job_id = build_job(tmp_path)
    dest = manifest.load_spec(prefix).destination
    env = {**os.environ, "CUTOUT_REDIS_URL": "redis://127.0.0.1:1/0"}
    report = _cli("report", job_id, "--dest", dest, "--json", env=env)
    assert report.returncode == 3, report.stderr  # finished, with failed inputs (README, "Exit codes")
    assert json.loads(report.stdout)["flag_counts"] == {"empty_alpha": 3, "full_frame_alpha": 3}
    text = _cli("report", job_id, "--dest", dest, env=env)
    assert "quality flags" in text.stdout and "empty_alpha" in text.stdout

    status = _cli("status", job_id, "--dest", dest, env=env)  # Redis lost: from the roll-ups
    assert "quality flags: empty_alpha ×3, full_frame_alpha ×3" in status.stdout, status.stdout
