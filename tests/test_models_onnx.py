"""The ONNX→torch converter and the IS-Net loading path, on a tiny graph built here with the
same quirks as the real IS-Net export: fp16 initializers behind Cast nodes, nodes stored out of
topological order, Resize targets baked as constants for the export size, fp32 Resize between
Casts, MaxPool with ceil_mode, dilated convs, side outputs."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cutout.jobs.errors import ModelError, WeightsChecksumError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models import registry
from cutout.workers.models.onnx_torch import (
    OnnxGraphModule,
    prepared_for_onnxruntime,
    size_alignment,
    topologically_sorted,
)
from cutout.workers.models.isnet import mask_output_name
from cutout.workers.segment import clear_segmenter_cache, get_segmenter

EXPORT_SIZE = 64


def _const(name: str, values) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype=np.int64), name + "_v")
    )


def build_tiny_isnet_like(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float16), name)

    initializers = [
        weight("w1", 8, 3, 3, 3), weight("b1", 8),
        weight("w2", 8, 8, 3, 3), weight("b2", 8),
        weight("w3", 1, 16, 3, 3), weight("b3", 1),
    ]  # fmt: skip
    half = TensorProto.FLOAT16
    nodes = [
        helper.make_node("Cast", ["input"], ["x16"], to=half),
        helper.make_node("Conv", ["x16", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),  # 32x32
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),  # 16
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        # upsample r2 to r1's size the way torch.onnx exports F.interpolate(size=...): shape[0:2] ++ const
        helper.make_node("Shape", ["r2"], ["s2"]),
        _const("zero", [0]), _const("two", [2]), _const("axis0", [0]),
        helper.make_node("Slice", ["s2", "zero", "two", "axis0"], ["nc"]),
        _const("target_hw", [EXPORT_SIZE // 2, EXPORT_SIZE // 2]),
        helper.make_node("Concat", ["nc", "target_hw"], ["sizes"], axis=0),
        helper.make_node("Cast", ["r2"], ["r2_f32"], to=TensorProto.FLOAT),
        helper.make_node("Resize", ["r2_f32", "", "", "sizes"], ["up_f32"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Cast", ["up_f32"], ["up"], to=half),
        helper.make_node("Concat", ["up", "r1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "c3"], ["c3x2"]),
        helper.make_node("Sigmoid", ["c3x2"], ["sig"]),
        helper.make_node("Cast", ["sig"], ["side"], to=TensorProto.FLOAT),
        # final output: back at the input size, like IS-Net's d1
        helper.make_node("Shape", ["sig"], ["s3"]),
        helper.make_node("Slice", ["s3", "zero", "two", "axis0"], ["nc3"]),
        _const("full_hw", [EXPORT_SIZE, EXPORT_SIZE]),
        helper.make_node("Concat", ["nc3", "full_hw"], ["sizes_full"], axis=0),
        helper.make_node("Cast", ["sig"], ["sig_f32"], to=TensorProto.FLOAT),
        helper.make_node("Resize", ["sig_f32", "", "", "sizes_full"], ["output"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
    ]  # fmt: skip
    nodes = nodes[::-1]  # the real export stores nodes out of order too
    graph = helper.make_graph(
        nodes,
        "tiny-isnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, EXPORT_SIZE, EXPORT_SIZE])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, EXPORT_SIZE, EXPORT_SIZE]),
            helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 1, EXPORT_SIZE // 2, EXPORT_SIZE // 2]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def tiny_model() -> onnx.ModelProto:
    return build_tiny_isnet_like()


def _onnxruntime(model: onnx.ModelProto, batch: np.ndarray, hw=None) -> np.ndarray:
    prepared = prepared_for_onnxruntime(model, ["output"], hw)
    session = ort.InferenceSession(prepared.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": batch})[0]


def _torch(model: onnx.ModelProto, batch: np.ndarray) -> np.ndarray:
    module = OnnxGraphModule(model, outputs=["output"]).eval()
    with torch.inference_mode():
        return module(torch.from_numpy(batch)).numpy()


def test_unsorted_graph_fails_the_checker_and_sorting_fixes_it(tiny_model):
    with pytest.raises(onnx.checker.ValidationError, match="topological"):
        onnx.checker.check_model(tiny_model)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(tiny_model)
    nodes = topologically_sorted(fixed.graph)
    del fixed.graph.node[:]
    fixed.graph.node.extend(nodes)
    onnx.checker.check_model(fixed)


def test_converted_module_matches_onnxruntime_at_export_size_with_a_batch(tiny_model):
    batch = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 3, EXPORT_SIZE, EXPORT_SIZE)).astype(np.float32)
    expected = _onnxruntime(tiny_model, batch)
    actual = _torch(tiny_model, batch)
    assert actual.shape == expected.shape == (2, 1, EXPORT_SIZE, EXPORT_SIZE)
    assert np.abs(actual - expected).max() < 1e-2  # ORT computes in fp16, torch in fp32
    assert actual.std() > 0.01  # not a constant map that would match trivially


def test_converted_module_runs_at_another_size_like_rewritten_onnxruntime(tiny_model):
    size = EXPORT_SIZE * 2
    assert size % size_alignment(tiny_model) == 0
    batch = np.random.default_rng(2).uniform(-0.5, 0.5, (1, 3, size, size)).astype(np.float32)
    expected = _onnxruntime(tiny_model, batch, (size, size))
    actual = _torch(tiny_model, batch)
    assert actual.shape == expected.shape == (1, 1, size, size)
    assert np.abs(actual - expected).max() < 1e-2


def test_size_alignment_of_the_tiny_graph(tiny_model):
    # export 64, baked targets 32 and 64: any even side scales them to whole pixels
    assert size_alignment(tiny_model) == 2


def test_fp16_initializers_become_fp32_buffers(tiny_model):
    module = OnnxGraphModule(tiny_model, outputs=["output"])
    floats = [b for b in module.buffers() if b.is_floating_point()]
    assert floats and all(b.dtype == torch.float32 for b in floats)


def test_unsupported_op_is_a_model_error(tiny_model):
    broken = onnx.ModelProto()
    broken.CopyFrom(tiny_model)
    for node in broken.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Elu"
    with pytest.raises(ModelError, match="Elu"):
        OnnxGraphModule(broken, outputs=["output"])


# --- the IS-Net loading path with tiny weights --------------------------------------------------
@pytest.fixture()
def tiny_weights(tmp_path, tiny_model):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(tiny_model.SerializeToString())
    clear_segmenter_cache()
    yield path
    clear_segmenter_cache()


def _images():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (90, 40, 3), dtype=np.uint8)]


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_isnet_loads_weights_from_options_and_returns_masks_at_original_size(tiny_weights, monkeypatch, runtime):
    monkeypatch.setenv("CUTOUT_RUNTIME", runtime)
    options = PipelineOptions(weights=str(tiny_weights), seg_size=64)
    segmenter = get_segmenter(options, device="cpu")
    assert segmenter.runtime == runtime and segmenter.input_size == 64
    images = _images()
    masks = segmenter.predict(images)
    assert [m.shape for m in masks] == [i.shape[:2] for i in images]
    assert all(m.dtype == np.float32 and 0.0 <= m.min() and m.max() <= 1.0 for m in masks)
    assert get_segmenter(options, device="cpu") is segmenter  # loaded once per process


def test_isnet_runtimes_agree_and_batching_changes_nothing(tiny_weights, monkeypatch):
    images = _images()
    options = PipelineOptions(weights=f"file://{tiny_weights}", seg_size=100)  # rounded to 100 (alignment 2)
    results = {}
    for runtime in ("torch", "onnxruntime"):
        monkeypatch.setenv("CUTOUT_RUNTIME", runtime)
        segmenter = get_segmenter(options, device="cpu")
        results[runtime] = segmenter.predict(images)
        one_by_one = [segmenter.predict([image])[0] for image in images]
        for batched, single in zip(results[runtime], one_by_one):
            assert np.abs(batched - single).max() < 1e-4
    for a, b in zip(results["torch"], results["onnxruntime"]):
        assert np.abs(a - b).max() < 1e-2


def test_isnet_from_models_dir_checks_the_sha(tiny_weights, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("CUTOUT_MODELS_DIR", str(models))
    spec = registry.get_model_spec("isnet-general")
    (models / spec.weights.filename).write_bytes(tiny_weights.read_bytes())
    with pytest.raises(WeightsChecksumError, match="cutout models fetch isnet-general"):
        get_segmenter(PipelineOptions(seg_size=64), device="cpu")

    digest = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    patched = dataclasses.replace(spec, weights=dataclasses.replace(spec.weights, sha256=digest))
    monkeypatch.setitem(registry._SPECS, "isnet-general", patched)
    masks = get_segmenter(PipelineOptions(seg_size=64), device="cpu").predict(_images())
    assert len(masks) == 2


def test_an_export_without_an_output_named_output_uses_its_first_output(tiny_weights, tmp_path, monkeypatch):
    """rembg's fp32 export (isnet-general-fp32) names its outputs by number, the mask first."""
    renamed = onnx.load(str(tiny_weights))
    for node in renamed.graph.node:
        node.output[:] = ["d1" if name == "output" else name for name in node.output]
    for output in renamed.graph.output:  # the mask first, then the side output
        output.name = "d1" if output.name == "output" else output.name
    assert [o.name for o in renamed.graph.output] == ["d1", "side"]
    assert mask_output_name(renamed) == "d1"
    side_first = onnx.load(str(tiny_weights))
    side_first.graph.output.reverse()
    assert mask_output_name(side_first) == "output"  # a named mask wins over the order
    path = tmp_path / "renamed.onnx"
    onnx.save(renamed, str(path))
    monkeypatch.setenv("CUTOUT_RUNTIME", "onnxruntime")
    original = get_segmenter(PipelineOptions(weights=str(tiny_weights), seg_size=64), device="cpu")
    fp32 = get_segmenter(
        PipelineOptions(model="isnet-general-fp32", weights=str(path), seg_size=64), device="cpu"
    )
    for a, b in zip(original.predict(_images()), fp32.predict(_images())):
        np.testing.assert_allclose(a, b, atol=1e-6)
