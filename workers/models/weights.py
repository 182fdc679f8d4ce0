"""Where weights live on disk, and how a model finds and checks its own.

Search order for a model's weights: ``options.weights`` (local path, ``file://``, or any URI
``cutout.jobs.storage.read_bytes`` understands, e.g. ``s3://``), then ``$CUTOUT_MODELS_DIR`` (default
``~/.cache/cutout/models``), then torch hub's checkpoint cache for torchvision files.
Weights from the models dir or torch hub must match their spec's sha256; an explicit
``options.weights`` is the user's own file and is not compared with the spec.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cutout.jobs.errors import MissingWeightsError, WeightsChecksumError
from cutout.jobs.settings import settings
from cutout.workers.models.registry import ModelSpec, WeightsSpec

_digests: dict[tuple[str, int, int], tuple[str, str]] = {}  # (path, size, mtime_ns) -> (sha256, md5)


def models_dir() -> Path:
    return Path(settings().models_dir or Path.home() / ".cache" / "cutout" / "models")


def torch_hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder, computed without importing torch."""
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        torch_home = os.path.join(cache, "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def file_digests(path: Path) -> tuple[str, str]:
    """sha256 and md5 of a file, in one read (md5 only for publishers that pin nothing else)."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha256.update(block)
            md5.update(block)
    return sha256.hexdigest(), md5.hexdigest()


def verify_file(path: Path, weights: WeightsSpec, model_name: str) -> None:
    """Raise ``WeightsChecksumError`` unless ``path`` has the spec's digests (memoised)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = file_digests(path)
    mismatch = weights.digest_mismatch(*_digests[key])
    if mismatch:
        raise WeightsChecksumError(
            f"{path} has {mismatch} for model {model_name!r}; "
            f"delete it and run: cutout models fetch {model_name} --force"
        )


def locate_weights(spec: ModelSpec, override: str | None = None) -> Path:
    """The local path of ``spec``'s weights, checked; ``override`` is ``options.weights``."""
    if override:
        return _materialise_override(override)
    weights = _require_weights(spec)
    for candidate in (models_dir() / weights.filename, torch_hub_checkpoints_dir() / weights.filename):
        if candidate.is_file():
            verify_file(candidate, weights, spec.name)
            return candidate
    raise MissingWeightsError(
        f"weights for model {spec.name!r} not found ({weights.filename} in {models_dir()}); "
        f"run: {spec.fetch_command}"
    )


def _require_weights(spec: ModelSpec) -> WeightsSpec:
    if spec.weights is None:
        raise MissingWeightsError(f"model {spec.name!r} has no weights to locate")
    return spec.weights


def _materialise_override(uri: str) -> Path:
    """A local path for a user-given weights URI; remote files are cached by content hash."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" not in uri:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise MissingWeightsError(f"weights file {path} does not exist (options.weights)")
        return path
    from cutout.jobs import storage  # lazy: cutout.jobs.storage pulls in boto3

    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    target = models_dir() / "remote" / digest / os.path.basename(uri.rstrip("/"))
    if not target.is_file():
        write_atomically(target, data)
    return target


def write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, target)
