#!/bin/sh
# Worker image entry point: stage weights from object storage if asked, then run `cutout ARGS`.
#   CUTOUT_WEIGHTS_URI=s3://bucket/models/isnet-general.onnx[,s3://...]
# Each object lands in $CUTOUT_MODELS_DIR under its own file name (skipped when present); the
# model's sha256 is checked when it loads, so a wrong file fails loudly rather than silently.
set -eu

if [ -n "${CUTOUT_WEIGHTS_URI:-}" ]; then
    python - "$CUTOUT_WEIGHTS_URI" <<'PY'
import os
import sys

from cutout.jobs import storage
from cutout.workers.models.weights import models_dir, write_atomically

for uri in filter(None, (u.strip() for u in sys.argv[1].split(","))):
    target = models_dir() / os.path.basename(uri.rstrip("/"))
    if target.is_file():
        print(f"[entrypoint] weights present: {target}", flush=True)
        continue
    print(f"[entrypoint] fetching {uri} -> {target}", flush=True)
    write_atomically(target, storage.read_bytes(uri))
PY
fi

exec cutout "$@"
