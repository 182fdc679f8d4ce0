# cutout submitter: submit jobs, follow progress, read reports. No torch, no GPU.
#   docker compose run --rm submitter submit s3://cutout-input/photos --to s3://cutout-output/photos
#   docker compose run --rm submitter status JOB
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/cutout \
    PATH=/opt/cutout/bin:$PATH

RUN python -m venv /opt/cutout
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobs ./jobs
COPY workers ./workers
COPY cutout ./cutout
# The base install only: the submitter sends tasks by name and never imports torch.
RUN pip install . \
    && cutout --help >/dev/null

RUN useradd --create-home --uid 1000 cutout
USER cutout
WORKDIR /home/cutout
ENTRYPOINT ["cutout"]
CMD ["--help"]
