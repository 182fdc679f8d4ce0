"""Where weights live on disk, and how a model finds and checks its own.

Search order for a model's weights: ``options.weights`` (local path, ``file://``, or any URI
``jobs.storage.read_bytes`` understands, e.g. ``s3://``), then ``$CUTOUT_MODELS_DIR`` (default
``~/.cache/cutout/models``), then torch hub's checkpoint cache for torchvision files.
Weights from the models dir or torch hub must match their spec's sha256; an explicit
``options.weights`` is the user's own file and is not compared with the spec.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jobs.errors import MissingWeightsError, WeightsChecksumError
from workers.models.registry import ModelSpec, WeightsSpec

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 already checked


def models_dir() -> Path:
    return Path(os.environ.get("CUTOUT_MODELS_DIR") or Path.home() / ".cache" / "cutout" / "models")


def torch_hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoint folder, computed without importing torch."""
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        torch_home = os.path.join(cache, "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, weights: WeightsSpec, model_name: str) -> None:
    """Raise ``WeightsChecksumError`` unless ``path`` hashes to the spec's sha256 (memoised)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _verified.get(key) or file_sha256(path)
    if not weights.matches_digest(digest):
        raise WeightsChecksumError(
            f"{path} has sha256 {digest}, expected {weights.sha256} for model {model_name!r}; "
            f"delete it and run: cutout models fetch {model_name} --force"
        )
    _verified[key] = digest


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
    from jobs import storage  # lazy: jobs.storage pulls in boto3

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
