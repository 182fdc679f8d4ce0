"""The deployment files, checked by real tools: docker-compose.yml through docker-compose's own
parser and validator (v1, in .cache/compose-venv: no Docker engine is needed for `config`),
the bucket-init and worker entry-point scripts by running them, the Dockerfiles by reading.

`bash infra/setup.sh --compose` (called by infra/test.sh) installs the compose validator.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_VENV = REPO_ROOT / ".cache" / "compose-venv"
WORKER_DOCKERFILE = REPO_ROOT / "infra" / "worker.Dockerfile"
SUBMITTER_DOCKERFILE = REPO_ROOT / "infra" / "submitter.Dockerfile"


def compose_command() -> list[str]:
    """docker-compose v1 from its venv, else `docker compose` v2 where a machine has it."""
    override = os.environ.get("CUTOUT_COMPOSE_BIN")
    if override:
        return override.split()
    v1 = COMPOSE_VENV / "bin" / "docker-compose"
    if v1.is_file():
        return [str(v1)]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail(
        f"no compose implementation: expected {v1}; run `bash infra/setup.sh --compose`",
        pytrace=False,
    )


def yaml_to_json(text: str) -> dict:
    """Parse YAML with whichever interpreter has PyYAML (the compose venv always does)."""
    for python in (COMPOSE_VENV / "bin" / "python", Path(sys.executable)):
        if not python.is_file():
            continue
        result = subprocess.run(
            [str(python), "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
            input=text, capture_output=True, text=True,
        )
        if result.returncode == 0:
            return json.loads(result.stdout)
    pytest.fail("no interpreter with PyYAML to read the compose output", pytrace=False)


def compose_config(tmp_path: Path, **env: str) -> dict:
    """`compose config` with a controlled environment: only PATH/HOME plus ``env``."""
    clean_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    clean_env.update(env)
    empty_env_file = tmp_path / "empty.env"  # a developer's .env must not leak into the test
    empty_env_file.write_text("")
    result = subprocess.run(
        [*compose_command(), "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True, text=True, env=clean_env, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, f"compose config failed:\n{result.stderr}\n{result.stdout}"
    return yaml_to_json(result.stdout)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    return compose_config(tmp_path_factory.mktemp("compose"))


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def test_compose_file_defines_the_stack(config):
    services = config["services"]
    assert {"redis", "minio", "createbuckets", "worker", "submitter", "flower", "prometheus"} <= set(services)
    assert services["submitter"]["profiles"] == ["tools"]
    assert services["flower"]["profiles"] == ["monitoring"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    for always_on in ("redis", "minio", "createbuckets", "worker"):
        assert not services[always_on].get("profiles"), f"{always_on} must start by default"


def test_redis_is_durable_and_healthchecked(config):
    redis = config["services"]["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert re.search(r"--appendonly\s+yes", command)
    assert re.search(r"--maxmemory-policy\s+noeviction", command)
    assert any(v.endswith(":/data") or ":/data:" in v for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_minio_and_bucket_creation(config):
    services = config["services"]
    minio = services["minio"]
    assert minio["image"].split("/")[-1].startswith("minio:")
    assert minio["command"][:2] == ["server", "/data"]
    assert "--console-address" in minio["command"]
    assert minio["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")

    buckets = services["createbuckets"]
    assert buckets["image"].split("/")[-1].startswith("mc:")
    assert buckets["depends_on"]["minio"]["condition"] == "service_healthy"
    env = environment(buckets)
    assert env["CUTOUT_INPUT_BUCKET"] and env["CUTOUT_OUTPUT_BUCKET"]
    assert env["CUTOUT_INPUT_BUCKET"] != env["CUTOUT_OUTPUT_BUCKET"]
    assert env["MINIO_ROOT_USER"] == environment(minio)["MINIO_ROOT_USER"]
    mounted = [v.split(":")[0] for v in buckets["volumes"]]
    assert str(REPO_ROOT / "infra" / "minio-init.sh") in mounted


def test_worker_reserves_a_gpu_and_waits_for_its_dependencies(config):
    worker = config["services"]["worker"]
    assert worker["build"]["dockerfile"] == "infra/worker.Dockerfile"
    assert worker["command"][:1] == ["worker"]
    assert "--concurrency" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if "gpu" in d.get("capabilities", [])]
    assert len(gpu) == 1
    assert gpu[0]["driver"] == "nvidia"
    assert str(gpu[0]["count"]) == "1"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["createbuckets"]["condition"] == "service_completed_successfully"
    models_dir = environment(worker)["CUTOUT_MODELS_DIR"]
    assert any(v.split(":")[1] == models_dir for v in worker["volumes"]), "models dir needs a volume"


@pytest.mark.parametrize("service", ["worker", "submitter"])
def test_app_environment_defaults_point_at_the_bundled_services(config, service):
    env = environment(config["services"][service])
    assert env["CUTOUT_BROKER_URL"] == "redis://redis:6379/0"
    assert env["CUTOUT_REDIS_URL"] == ""  # empty: progress lives in the broker's Redis
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    minio_env = environment(config["services"]["minio"])
    assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"]


def test_environment_overrides_reach_the_services(tmp_path):
    """A cluster deployment: external broker, real S3 (empty endpoint), all GPUs of a host."""
    config = compose_config(
        tmp_path,
        CUTOUT_BROKER_URL="redis://broker.internal:6379/2",
        AWS_ENDPOINT_URL="",
        AWS_ACCESS_KEY_ID="AKIAEXAMPLE",
        AWS_SECRET_ACCESS_KEY="secret-example",
        CUTOUT_GPU_COUNT="all",
        CUTOUT_CONCURRENCY="4",
        CUTOUT_WORKER_GPUS="0,1,2,3",
    )
    worker = config["services"]["worker"]
    env = environment(worker)
    assert env["CUTOUT_BROKER_URL"] == "redis://broker.internal:6379/2"
    assert env["AWS_ENDPOINT_URL"] == ""  # boto3 then talks to AWS S3 itself
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAEXAMPLE"
    assert env["CUTOUT_WORKER_GPUS"] == "0,1,2,3"
    assert worker["command"] == ["worker", "--concurrency", "4"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == "all"
    flower_command = " ".join(config["services"]["flower"]["command"])
    assert "--broker=redis://broker.internal:6379/2" in flower_command


def test_prometheus_scrapes_every_worker_on_its_metrics_port(config):
    services = config["services"]
    worker, prometheus = services["worker"], services["prometheus"]
    port = environment(worker)["CUTOUT_METRICS_PORT"]
    assert port in [str(p) for p in worker["expose"]]
    assert environment(worker)["CUTOUT_TASK_EVENTS"] == "0"  # Flower's task view is opt-in
    mounts = {v.split(":")[0]: v.split(":")[1] for v in prometheus["volumes"]}
    config_in_container = mounts[str(REPO_ROOT / "infra" / "prometheus.yml")]
    assert f"--config.file={config_in_container}" in prometheus["command"]
    assert prometheus["image"].split("/")[-1].startswith("prometheus:")
    scrape = yaml_to_json((REPO_ROOT / "infra" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "cutout-workers"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and str(discovery["port"]) == port
    assert discovery["type"] == "A"


def test_task_events_for_flower_are_switched_on_by_one_variable(tmp_path):
    worker = compose_config(tmp_path, CUTOUT_TASK_EVENTS="1")["services"]["worker"]
    assert environment(worker)["CUTOUT_TASK_EVENTS"] == "1"


def test_minio_init_creates_both_buckets_idempotently(tmp_path):
    """Run the init script against a stand-in `mc` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "mc.log"
    fake_mc = bin_dir / "mc"
    fake_mc.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    fake_mc.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MINIO_ROOT_USER": "user1",
        "MINIO_ROOT_PASSWORD": "pass1",
        "CUTOUT_INPUT_BUCKET": "in-bucket",
        "CUTOUT_OUTPUT_BUCKET": "out-bucket",
    }
    result = subprocess.run(["sh", str(REPO_ROOT / "infra" / "minio-init.sh")],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "alias set local http://minio:9000 user1 pass1"
    assert "mb --ignore-existing local/in-bucket" in calls
    assert "mb --ignore-existing local/out-bucket" in calls


def test_minio_init_fails_without_credentials(tmp_path):
    result = subprocess.run(["sh", str(REPO_ROOT / "infra" / "minio-init.sh")],
                            env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode != 0
    assert "MINIO_ROOT_USER" in result.stderr


def run_worker_entrypoint(tmp_path: Path, weights_uri: str) -> tuple[subprocess.CompletedProcess, Path]:
    """The entry point with this venv's python and a stand-in `cutout` that echoes its args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_cutout = bin_dir / "cutout"
    fake_cutout.write_text('#!/bin/sh\necho "cutout called with: $*"\n')
    fake_cutout.chmod(0o755)
    models = tmp_path / "models"
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),
        "CUTOUT_MODELS_DIR": str(models),
        "CUTOUT_WEIGHTS_URI": weights_uri,
    }
    result = subprocess.run(
        ["sh", str(REPO_ROOT / "infra" / "worker-entrypoint.sh"), "worker", "--concurrency", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    return result, models


def test_worker_entrypoint_stages_weights_then_runs_cutout(tmp_path):
    source = tmp_path / "bucket" / "isnet-general.onnx"
    source.parent.mkdir()
    source.write_bytes(b"weights-v1")

    result, models = run_worker_entrypoint(tmp_path, f"file://{source}")
    assert result.returncode == 0, result.stderr
    assert (models / "isnet-general.onnx").read_bytes() == b"weights-v1"
    assert result.stdout.strip().endswith("cutout called with: worker --concurrency 1")

    source.write_bytes(b"weights-v2")  # a present file is kept: no download at every start
    result, models = run_worker_entrypoint(tmp_path, f"file://{source}")
    assert result.returncode == 0, result.stderr
    assert "weights present" in result.stdout
    assert (models / "isnet-general.onnx").read_bytes() == b"weights-v1"


def test_worker_entrypoint_refuses_to_start_when_weights_are_missing(tmp_path):
    result, _ = run_worker_entrypoint(tmp_path, f"file://{tmp_path}/nowhere/model.onnx")
    assert result.returncode != 0
    assert "cutout called with" not in result.stdout


# --- Dockerfiles -------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, f"{path.name}: dangling line continuation"
    pairs = []
    for statement in joined:
        keyword, _, args = statement.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", [WORKER_DOCKERFILE, SUBMITTER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    instructions = dockerfile_instructions(dockerfile)
    keywords = [k for k, _ in instructions]
    first_build_step = keywords.index("FROM")
    assert set(keywords[:first_build_step]) <= {"ARG"}, "only ARG may come before FROM"
    assert keywords.count("FROM") == 1
    users = [args for k, args in instructions if k == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    entrypoint = next(args for k, args in instructions if k == "ENTRYPOINT")
    assert "cutout" in entrypoint
    # Everything COPY'd exists and is not excluded from the build context.
    ignored = dockerignore_patterns()
    for keyword, args in instructions:
        if keyword != "COPY":
            continue
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in repo"
            top = source.split("/")[0]
            assert top not in ignored, f"{dockerfile.name}: COPY {source} is in .dockerignore"


def test_worker_dockerfile_installs_the_worker_extra_on_a_cuda_base():
    instructions = dockerfile_instructions(WORKER_DOCKERFILE)
    base_arg = next(args for k, args in instructions if k == "ARG" and args.startswith("BASE_IMAGE="))
    assert "cuda" in base_arg
    runs = " ".join(args for k, args in instructions if k == "RUN")
    assert re.search(r"pip install '\.\[worker\]'", runs)
    assert "cutout models fetch" in runs
    assert "import pymatting" in runs  # numba cache built into the image


def test_submitter_dockerfile_installs_no_extras():
    instructions = dockerfile_instructions(SUBMITTER_DOCKERFILE)
    assert next(args for k, args in instructions if k == "FROM").startswith("python:3.11-slim")
    installs = [args for k, args in instructions if k == "RUN" and "pip install" in args]
    assert installs
    for command in installs:
        assert "[" not in command, f"submitter must not install extras: {command}"
        assert "torch" not in command


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = dockerignore_patterns()
    for path in (".venv", ".cache", "test-artifacts", ".git"):
        assert path in ignored
