#!/usr/bin/env bash
# The distributed path end to end on one machine, without Docker: a private redis-server, one
# `cutout worker`, `cutout submit` of a few real photos, `cutout status --watch`, `cutout report`.
#
#   bash infra/demo.sh [N_IMAGES]        # default 8 photos from ../shared/testdata/grabcut_msrc
#
# Environment:
#   CUTOUT_DEMO_MODEL   segmentation model (default grabcut: no weights to download; for IS-Net
#                       run `cutout models fetch isnet-general` first, then set isnet-general)
#   CUTOUT_DEMO_OUT     output folder (default: a new temporary folder)
#   CUTOUT_EVAL_DATA    test data root (default ../shared/testdata)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

N_IMAGES="${1:-8}"
MODEL="${CUTOUT_DEMO_MODEL:-grabcut}"
DATA="${CUTOUT_EVAL_DATA:-$REPO_ROOT/../shared/testdata}/grabcut_msrc/image"
CUTOUT="$REPO_ROOT/.venv/bin/cutout"
WORK="$(mktemp -d -t cutout-demo.XXXXXX)"
OUT="${CUTOUT_DEMO_OUT:-$WORK/output}"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$REPO_ROOT/.cache/numba}"

say() { echo "[demo] $*"; }

[ -x "$CUTOUT" ] || { echo "[demo] run 'bash infra/setup.sh' first" >&2; exit 1; }
[ -d "$DATA" ] || { echo "[demo] no photos in $DATA (set CUTOUT_EVAL_DATA)" >&2; exit 1; }

REDIS_PID=""
WORKER_PID=""
cleanup() {
    # Only the processes this script started, by their ids.
    if [ -n "$WORKER_PID" ] && kill -0 "$WORKER_PID" 2>/dev/null; then
        kill -TERM "$WORKER_PID" && wait "$WORKER_PID" 2>/dev/null || true
    fi
    if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
        kill -TERM "$REDIS_PID" && wait "$REDIS_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

PORT="$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
say "starting redis-server on 127.0.0.1:$PORT (data in $WORK)"
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$WORK" --save "" --appendonly no \
    >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 50); do
    redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
redis-cli -p "$PORT" ping >/dev/null
export CUTOUT_BROKER_URL="redis://127.0.0.1:$PORT/0"

mkdir -p "$WORK/input" "$OUT"
find "$DATA" -maxdepth 1 -type f \( -name '*.jpg' -o -name '*.png' -o -name '*.bmp' \) | sort \
    | head -n "$N_IMAGES" | while read -r photo; do cp "$photo" "$WORK/input/"; done
say "$(ls "$WORK/input" | wc -l) photos copied to $WORK/input"

say "starting one worker (log: $WORK/worker.log)"
"$CUTOUT" worker --concurrency 1 >"$WORK/worker.log" 2>&1 &
WORKER_PID=$!

say "submitting: model=$MODEL, 4 photos per shard, destination file://$OUT"
JOB="$("$CUTOUT" submit "$WORK/input" --to "file://$OUT" --model "$MODEL" --shard-size 4 | head -n 1)"
say "job $JOB"

if ! timeout 1800 "$CUTOUT" status "$JOB" --watch --interval 1; then
    echo "[demo] the job did not finish; last worker log lines:" >&2
    tail -n 30 "$WORK/worker.log" >&2
    exit 1
fi
"$CUTOUT" report "$JOB"
say "outputs in $OUT:"
find "$OUT" -maxdepth 1 -type f | sort | head -n 20
say "work folder kept (inputs, logs, outputs): $WORK"
