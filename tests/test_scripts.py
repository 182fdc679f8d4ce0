"""The setup/test/CI scripts: they parse, they are executable, CI calls the README's command."""
from __future__ import annotations

import os
import subprocess
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
