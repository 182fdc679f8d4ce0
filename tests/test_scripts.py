"""The setup/test/CI scripts: they parse, they are executable, CI calls the README's command."""
from __future__ import annotations

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
