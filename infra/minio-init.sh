#!/bin/sh
# One-shot bucket creation for the compose stack (runs in the minio/mc image). Idempotent.
set -eu
: "${MINIO_URL:=http://minio:9000}"
: "${CUTOUT_INPUT_BUCKET:=cutout-input}"
: "${CUTOUT_OUTPUT_BUCKET:=cutout-output}"

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
for bucket in "$CUTOUT_INPUT_BUCKET" "$CUTOUT_OUTPUT_BUCKET"; do
    mc mb --ignore-existing "local/$bucket"
done
mc ls local
