#!/usr/bin/env bash
# Prepare a machine to run and test cutout: system packages, .venv, the project and its extras.
#
# Run from anywhere (it works in the repository root). Idempotent: a second run only checks
# and is quick, because the install step is skipped while a stamp file matches the hash of
# pyproject.toml, this script and the torch spec.
#
#   bash infra/setup.sh            # runtime + dev tools in .venv
#   bash infra/setup.sh --compose  # also docker-compose v1 in .cache/compose-venv (validates
#                                  # docker-compose.yml where no Docker engine exists)
#
# Environment:
#   CUTOUT_TORCH_SPEC   pip requirement(s) for torch, e.g. "torch==2.5.1 torchvision==0.20.1"
#                       (default: pinned per architecture, see torch_spec below)
#   PYTHON              interpreter that creates .venv (default: python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="$REPO_ROOT/.venv"
COMPOSE_VENV="$REPO_ROOT/.cache/compose-venv"
NUMBA_CACHE="$REPO_ROOT/.cache/numba"
STAMP="$VENV/.cutout-setup-stamp"
PYTHON="${PYTHON:-python3}"

WITH_COMPOSE=0
for arg in "$@"; do
    case "$arg" in
        --compose) WITH_COMPOSE=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "setup: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { echo "[setup] $*"; }

as_root() {
    # Root on a fresh machine; sudo where we are not root and it exists.
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "[setup] need root to run: $* (no sudo found)" >&2
        return 1
    fi
}

install_system_packages() {
    local missing=()
    command -v "$PYTHON" >/dev/null 2>&1 || missing+=(python3)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    "$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
    command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
    # A real headless browser for tests/test_report_html.py (the job report page).
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    if [ "${#missing[@]}" -eq 0 ]; then
        say "system packages present (python3, python3-venv, redis-server, redis-tools, chromium)"
        return
    fi
    say "installing apt packages: ${missing[*]}"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

torch_spec() {
    # This machine's pip has torch 2.14.1 on local disk (capped by /etc/xdg/pip); elsewhere pip
    # picks a wheel from PyPI. Override with CUTOUT_TORCH_SPEC.
    if [ -n "${CUTOUT_TORCH_SPEC:-}" ]; then
        echo "$CUTOUT_TORCH_SPEC"
        return
    fi
    case "$(uname -m)" in
        x86_64|amd64) echo "torch==2.14.1 torchvision==0.29.1" ;;
        aarch64|arm64) echo "torch==2.9.1 torchvision==0.24.1" ;;
        *) echo "torch torchvision" ;;
    esac
}

wanted_stamp() {
    # Anything that changes what gets installed changes the stamp.
    {
        sha256sum pyproject.toml infra/setup.sh
        torch_spec
        "$VENV/bin/python" -c "import sys; print(sys.version)"
    } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
        say "reusing $VENV ($("$VENV/bin/python" --version))"
        return
    fi
    say "creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
}

install_python_packages() {
    local want
    want="$(wanted_stamp)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        say "python packages up to date (stamp matches pyproject.toml); skipping pip"
        return
    fi
    local pip=("$VENV/bin/python" -m pip --quiet)
    say "upgrading pip"
    "${pip[@]}" install --upgrade pip
    local spec
    spec="$(torch_spec)"
    say "installing torch first: $spec"
    # shellcheck disable=SC2086  # the spec is a list of requirements
    if ! "${pip[@]}" install $spec; then
        if [ -n "${CUTOUT_TORCH_SPEC:-}" ]; then
            say "could not install CUTOUT_TORCH_SPEC=$spec" >&2
            return 1
        fi
        say "pinned torch not available here; letting pip pick torch and torchvision"
        "${pip[@]}" install torch torchvision
    fi
    # Before 0.2 the distribution was called "cutout" and put top-level jobs/ and workers/
    # packages on the path; an old venv must not keep them.
    "${pip[@]}" uninstall -y cutout >/dev/null 2>&1 || true
    say "installing the project: pip install -e '.[worker,dev]'"
    "${pip[@]}" install -e '.[worker,dev]'
    echo "$want" >"$STAMP"
    say "wrote stamp $STAMP"
}

persist_numba_cache_dir() {
    # pymatting compiles numba kernels at import (~70 s cold). A .pth line in the venv sets a
    # default NUMBA_CACHE_DIR for every interpreter of this venv, so the cache survives runs.
    local site_packages pth
    site_packages="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    pth="$site_packages/cutout_numba_cache.pth"
    local line="import os; os.environ.setdefault('NUMBA_CACHE_DIR', '$NUMBA_CACHE')"
    mkdir -p "$NUMBA_CACHE"
    if [ -f "$pth" ] && [ "$(cat "$pth")" = "$line" ]; then
        say "NUMBA_CACHE_DIR defaults to $NUMBA_CACHE (via $pth)"
        return
    fi
    echo "$line" >"$pth"
    say "set NUMBA_CACHE_DIR default to $NUMBA_CACHE (wrote $pth)"
}

install_compose_validator() {
    # docker-compose v1 parses and validates compose files without a Docker engine. It pins an
    # old PyYAML that must be built without build isolation, so it lives in its own venv.
    if [ -x "$COMPOSE_VENV/bin/docker-compose" ] \
        && "$COMPOSE_VENV/bin/docker-compose" version >/dev/null 2>&1; then
        say "docker-compose v1 present in $COMPOSE_VENV"
        return
    fi
    say "installing docker-compose v1 into $COMPOSE_VENV (for tests/test_compose.py)"
    rm -rf "$COMPOSE_VENV"
    mkdir -p "$(dirname "$COMPOSE_VENV")"
    "$PYTHON" -m venv "$COMPOSE_VENV"
    local pip=("$COMPOSE_VENV/bin/python" -m pip --quiet)
    "${pip[@]}" install 'cython<3' wheel setuptools
    "${pip[@]}" install --no-build-isolation pyyaml==5.4.1
    "${pip[@]}" install docker-compose
    "$COMPOSE_VENV/bin/docker-compose" version
}

install_system_packages
ensure_venv
install_python_packages
persist_numba_cache_dir
if [ "$WITH_COMPOSE" -eq 1 ]; then
    install_compose_validator
fi
say "done: activate with 'source .venv/bin/activate' or call .venv/bin/cutout"
