"""The setup/test/CI scripts: they parse, they are executable, CI calls the README's command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = sorted((REPO_ROOT / "infra").glob("*.sh")) + [REPO_ROOT / ".ci" / "run"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_script_parses_and_is_executable(script):
    shell = "bash" if script.read_text().startswith("#!/usr/bin/env bash") else "sh"
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_ci_runs_the_test_command_strictly():
    text = (REPO_ROOT / ".ci" / "run").read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "bash infra/test.sh" in text


def test_setup_rejects_unknown_arguments_before_touching_anything():
    result = subprocess.run(["bash", str(REPO_ROOT / "infra" / "setup.sh"), "--no-such-flag"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown argument --no-such-flag" in result.stderr
    assert "[setup] reusing" not in result.stdout


def test_setup_help_lists_its_options():
    result = subprocess.run(["bash", str(REPO_ROOT / "infra" / "setup.sh"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "--compose" in result.stdout and "CUTOUT_TORCH_SPEC" in result.stdout


def _bench_gpu(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_gpu.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})


def _table_rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_gpu_benchmark_runs_its_tiny_configuration_on_the_cpu():
    """The GPU benchmark cannot rot unseen: its tiny configuration runs here, every row measured."""
    result = _bench_gpu("--device", "cpu", "--tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    header, *rows = _table_rows(result.stdout)
    assert header == ["preset", "runtime", "batch", "images", "failed", "wall s", "cpu s (user+sys)",
                      "img/s", "gpu busy", "peak memory"]
    configurations = {(preset, runtime, batch) for preset, runtime, batch, *_ in rows}
    assert configurations == {(p, r, b) for p in ("fast", "balanced", "best")
                              for r in ("torch", "onnxruntime") for b in ("1", "2")}
    for _preset, _runtime, _batch, images, failed, wall, cpu, rate, busy, peak in rows:
        assert (images, failed, busy) == ("2", "0", "n/a")
        assert float(wall) > 0 and float(cpu) >= 0 and float(rate) > 0
        assert peak.endswith("MiB RSS") and float(peak.split()[0]) > 0


def test_gpu_benchmark_names_a_missing_gpu_in_one_line():
    result = _bench_gpu("--device", "cuda:0", "--tiny", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bench_gpu: error: device 'cuda:0' asked for, but torch sees no CUDA GPU here; "
        "use --device cpu (or leave it out)"]


def test_scale_benchmark_runs_small_and_status_stays_off_storage(tmp_path):
    """bench_scale.py cannot rot unseen: at 2000 inputs (local and on moto's S3) it prints every
    row, the manifest it built holds every input once, and the request counts it measured meet
    the bookkeeping bounds (status with Redis up at most 20 requests; Redis lost at most
    10 + shards/1000; report at most 30 + shards/100)."""
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_scale.py"), "--sizes", "2000",
                             "--s3", "--json", str(figures)],
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    header, *rows = _table_rows(result.stdout)
    assert header[1:] == ["2e3 local", "2e3 s3 (moto)"]
    names = [row[0] for row in rows]
    for wanted in ("submit wall / CPU / peak RSS", "Redis after submit / broker messages",
                   "last shard → queryable manifest", "status, Redis up: wall / requests",
                   "status, Redis lost: wall / requests", "report (text): wall / requests"):
        assert wanted in names, names
    assert all(len(row) == 3 and all(row) for row in rows), rows
    for measured in json.loads(figures.read_text()):
        shards = measured["submit"]["shards"]
        assert measured["finish"]["rows"] == measured["finish"]["distinct_inputs"] == 3000  # + 1000 incremental
        assert measured["status_up"]["requests"] <= 20, measured["status_up"]
        assert measured["status_lost"]["requests"] <= 10 + shards // 1000, measured["status_lost"]
        assert measured["report"]["requests"] <= 30 + shards // 100, measured["report"]
        assert "3000/3000 inputs" in measured["status_up"]["first_line"]
    on_s3 = json.loads(figures.read_text())[1]
    assert on_s3["status_lost"]["boto"], "moto's requests were not counted"
