"""A small ONNX → torch interpreter for the convolutional graphs we ship (IS-Net).

Why not onnx2torch & co.: we need exactly a dozen ops, plus three quirks of the IS-Net export
that generic converters trip on — nodes stored out of topological order, fp16 initializers
wrapped in ``Cast`` nodes, and ``Resize`` targets baked in as constants for the 1024×1024
export size. Here fp16 weights become fp32 parameters, float ``Cast`` nodes are no-ops, nodes
are sorted and pruned to the requested outputs, the batch dimension is free, and ``Resize``
targets are scaled with the actual input size (``spatial_scale``), so the graph runs at any
input size the network's pooling divides evenly (see ``size_alignment``).

The same graph edits for onnxruntime (sorted nodes, fewer outputs, dynamic batch, rescaled
``Resize`` constants) live here too, so both runtimes see the same network.
"""
from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from cutout.jobs.errors import ModelError

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


# --- graph edits shared by both runtimes ------------------------------------------------------
def topologically_sorted(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's algorithm over the node list; raises ``ModelError`` on a cycle or a dangling input."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output}
    waiting_on: dict[int, int] = {}
    consumers: dict[int, list[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        needs = {name for name in node.input if name not in available}
        for name in needs:
            if name not in producers:
                raise ModelError(f"ONNX node {node.name!r} reads {name!r}, which nothing produces")
            consumers[producers[name]].append(index)
        waiting_on[index] = len(needs)
    ready = deque(index for index, count in waiting_on.items() if count == 0)
    order: list[int] = []
    while ready:
        index = ready.popleft()
        order.append(index)
        for consumer in consumers[index]:
            waiting_on[consumer] -= 1
            if waiting_on[consumer] == 0:
                ready.append(consumer)
    if len(order) != len(graph.node):
        raise ModelError("ONNX graph has a cycle")
    return [graph.node[index] for index in order]


def needed_nodes(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The (sorted) nodes that contribute to ``outputs``; everything else is dead weight."""
    wanted = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if wanted & set(node.output):
            kept.append(node)
            wanted.update(name for name in node.input if name)
    return kept[::-1]


def prepared_for_onnxruntime(
    model: onnx.ModelProto, outputs: Sequence[str], input_hw: tuple[int, int] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` that onnxruntime accepts: sorted, pruned, dynamic batch, and, when
    ``input_hw`` differs from the export size, ``Resize`` constants scaled to match it."""
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    graph = edited.graph
    nodes = needed_nodes(topologically_sorted(graph), outputs)
    reference_hw = declared_input_hw(model)
    if input_hw and reference_hw and tuple(input_hw) != reference_hw:
        _rescale_constant_resize_targets(nodes, graph, reference_hw, tuple(input_hw))
        nodes = needed_nodes(nodes, outputs)  # drop the constants the scaled copies replaced
    del graph.node[:]
    graph.node.extend(nodes)
    kept_outputs = [o for o in graph.output if o.name in set(outputs)]
    for output in kept_outputs:
        output.type.tensor_type.ClearField("shape")  # the export size no longer holds
    del graph.output[:]
    graph.output.extend(kept_outputs)
    used = {name for node in nodes for name in node.input}
    kept_inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "batch"
    if input_hw:
        dims[2].dim_value, dims[3].dim_value = input_hw
    del graph.value_info[:]  # shapes recorded for the export size would now be wrong
    return edited


def declared_input_hw(model: onnx.ModelProto) -> tuple[int, int] | None:
    """The fixed (H, W) of the first graph input, or None when it is symbolic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not (dims[2].HasField("dim_value") and dims[3].HasField("dim_value")):
        return None
    return dims[2].dim_value, dims[3].dim_value


def resize_constant_targets(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """The constant spatial (H, W) targets of every ``Resize`` whose sizes are built from one."""
    nodes = list(model.graph.node)
    constants = _constant_values(nodes, model.graph)
    producers = {out: node for node in nodes for out in node.output}
    targets = []
    for node in nodes:
        if node.op_type != "Resize" or len(node.input) < 4 or not node.input[3]:
            continue
        for name in _spatial_constant_inputs(node.input[3], producers, constants):
            values = constants[name].reshape(-1)
            targets.append((int(values[-2]), int(values[-1])))
    return targets


def size_alignment(model: onnx.ModelProto) -> int:
    """The step an input side must be a multiple of for every baked ``Resize`` target to scale
    to a whole number (e.g. 64 for IS-Net exported at 1024: its deepest map is 1024/64)."""
    reference = declared_input_hw(model)
    targets = [side for hw in resize_constant_targets(model) for side in hw]
    if not reference or not targets:
        return 1
    common = math.gcd(*reference, *targets)
    return max(reference) // common


def _constant_values(nodes, graph) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT64}
    for node in nodes:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _spatial_constant_inputs(sizes_name, producers, constants) -> list[str]:
    """Names of the constant tensors that hold a ``Resize``'s spatial target."""
    if sizes_name in constants:
        return [sizes_name]
    producer = producers.get(sizes_name)
    if producer is not None and producer.op_type == "Concat":
        last = producer.input[-1]
        if last in constants and constants[last].size == 2:
            return [last]
    return []


def _rescale_constant_resize_targets(nodes, graph, reference_hw, input_hw) -> None:
    constants = _constant_values(nodes, graph)
    producers = {out: node for node in nodes for out in node.output}
    renamed: dict[str, str] = {}
    for node in nodes:
        if node.op_type != "Resize" or len(node.input) < 4 or not node.input[3]:
            continue
        for name in _spatial_constant_inputs(node.input[3], producers, constants):
            if name in renamed:
                continue
            values = constants[name].copy().reshape(-1)
            values[-2:] = _scaled(values[-2:], reference_hw, input_hw)
            new_name = f"{name}__scaled"
            graph.initializer.append(numpy_helper.from_array(values.reshape(constants[name].shape), new_name))
            renamed[name] = new_name
    for node in nodes:
        for index, name in enumerate(node.input):
            if name in renamed:
                node.input[index] = renamed[name]


def _scaled(target_hw, reference_hw, input_hw) -> list[int]:
    scaled = []
    for target, reference, actual in zip(target_hw, reference_hw, input_hw):
        value = int(target) * actual / reference
        if abs(value - round(value)) > 1e-6:
            raise ModelError(
                f"input size {input_hw} does not scale Resize target {int(target)} "
                f"(export size {reference_hw}) to whole pixels; use a multiple of the model's alignment"
            )
        scaled.append(int(round(value)))
    return scaled


# --- the interpreter --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Step:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


class OnnxGraphModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops. ``forward(x)`` returns the requested outputs (one
    tensor when a single output was asked for). Float initializers are fp32 buffers."""

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None):
        super().__init__()
        graph = model.graph
        self.input_name = graph.input[0].name
        self.output_names = tuple(outputs or [o.name for o in graph.output])
        self.reference_hw = declared_input_hw(model)
        nodes = needed_nodes(topologically_sorted(graph), self.output_names)
        used = {name for node in nodes for name in node.input}
        self._buffer_names: dict[str, str] = {}
        for index, tensor in enumerate(graph.initializer):
            if tensor.name in used:
                self._add_initializer(index, tensor)
        self.steps = [self._step(node) for node in nodes]
        for step in self.steps:
            if step.op not in _OPS:
                raise ModelError(f"ONNX op {step.op!r} is not supported by the torch converter")
        self._last_use = self._last_uses()

    def _add_initializer(self, index: int, tensor: onnx.TensorProto) -> None:
        array = numpy_helper.to_array(tensor)
        value = torch.from_numpy(array.astype(np.float32) if tensor.data_type in _FLOAT_TYPES else array.copy())
        buffer_name = f"init_{index}"
        self.register_buffer(buffer_name, value)
        self._buffer_names[tensor.name] = buffer_name

    @staticmethod
    def _step(node: onnx.NodeProto) -> _Step:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant":
            attrs = {"value": torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())}
        return _Step(node.op_type, tuple(node.input), tuple(node.output), attrs)

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            for name in step.inputs:
                last[name] = index
        for name in self.output_names:
            last[name] = len(self.steps)
        return last

    def spatial_scale(self, x: torch.Tensor) -> tuple[float, float]:
        """Actual input (H, W) over the export size: how much to scale baked Resize targets."""
        if self.reference_hw is None:
            return 1.0, 1.0
        return x.shape[-2] / self.reference_hw[0], x.shape[-1] / self.reference_hw[1]

    def forward(self, x: torch.Tensor):
        values: dict[str, Any] = {self.input_name: x, "": None}
        for name, buffer_name in self._buffer_names.items():
            values[name] = getattr(self, buffer_name)
        context = {"scale": self.spatial_scale(x)}
        for index, step in enumerate(self.steps):
            args = [values[name] for name in step.inputs]
            results = _OPS[step.op](args, step.attrs, context)
            for name, value in zip(step.outputs, results):
                values[name] = value
            for name in set(step.inputs):
                if self._last_use.get(name) == index and name not in self._buffer_names:
                    values.pop(name, None)
        out = tuple(values[name] for name in self.output_names)
        return out[0] if len(out) == 1 else out


# --- op implementations: (inputs, attributes, context) -> tuple of outputs -------------------
def _symmetric_pads(attrs: dict, op: str) -> tuple[int, int]:
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ModelError(f"{op}: auto_pad is not supported")
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise ModelError(f"{op}: asymmetric pads {pads} are not supported")
    return pads[0], pads[1]


def _conv(args, attrs, context):
    x, weight, *rest = args
    bias = rest[0] if rest else None
    return (
        F.conv2d(
            x,
            weight,
            bias,
            stride=tuple(attrs.get("strides", [1, 1])),
            padding=_symmetric_pads(attrs, "Conv"),
            dilation=tuple(attrs.get("dilations", [1, 1])),
            groups=attrs.get("group", 1),
        ),
    )


def _max_pool(args, attrs, context):
    kernel = tuple(attrs["kernel_shape"])
    return (
        F.max_pool2d(
            args[0],
            kernel,
            stride=tuple(attrs.get("strides", kernel)),
            padding=_symmetric_pads(attrs, "MaxPool"),
            dilation=tuple(attrs.get("dilations", [1, 1])),
            ceil_mode=bool(attrs.get("ceil_mode", 0)),
        ),
    )


def _resize(args, attrs, context):
    """Resize to the spatial part of ``sizes`` (scaled with the input) or by ``scales``;
    batch and channels always follow the input tensor."""
    x, _roi, scales, *rest = args
    sizes = rest[0] if rest else None
    mode = _text(attrs.get("mode", "nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    if sizes is not None:
        scale_h, scale_w = context["scale"]
        target_h, target_w = (int(v) for v in sizes.reshape(-1)[-2:].tolist())
        size = (round(target_h * scale_h), round(target_w * scale_w))
        kwargs: dict[str, Any] = {"size": size}
    else:
        kwargs = {"scale_factor": tuple(float(s) for s in scales.reshape(-1)[-2:].tolist())}
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return (F.interpolate(x, mode="bilinear", align_corners=transform == "align_corners", **kwargs),)
    if mode == "nearest" and transform == "asymmetric":
        return (F.interpolate(x, mode="nearest", **kwargs),)
    raise ModelError(f"Resize mode={mode} coordinate_transformation_mode={transform} is not supported")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cast(args, attrs, context):
    """Float↔float casts are no-ops (we compute in the input's float type); others are real."""
    x = args[0]
    if attrs["to"] in _FLOAT_TYPES and (not torch.is_tensor(x) or x.is_floating_point()):
        return (x,)
    dtype = {onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32}.get(attrs["to"])
    if dtype is None:
        raise ModelError(f"Cast to ONNX type {attrs['to']} is not supported")
    return (torch.as_tensor(x).to(dtype),)


def _slice(args, attrs, context):
    data, starts, ends, *rest = args
    axes = rest[0].tolist() if rest and rest[0] is not None else list(range(len(starts)))
    steps = rest[1].tolist() if len(rest) > 1 and rest[1] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        index[axis] = slice(start, min(end, data.shape[axis]), step)
    return (data[tuple(index)],)


def _gather(args, attrs, context):
    data, indices = args
    return (torch.index_select(data, attrs.get("axis", 0), indices.reshape(-1)).reshape(
        data.shape[: attrs.get("axis", 0)] + indices.shape + data.shape[attrs.get("axis", 0) + 1 :]
    ),)


def _unsqueeze(args, attrs, context):
    x = args[0]
    axes = args[1].tolist() if len(args) > 1 else list(attrs["axes"])
    for axis in sorted(a % (x.dim() + len(axes)) for a in axes):
        x = x.unsqueeze(axis)
    return (x,)


_OPS = {
    "Conv": _conv,
    "Relu": lambda args, attrs, context: (F.relu(args[0]),),
    "Sigmoid": lambda args, attrs, context: (torch.sigmoid(args[0]),),
    "Add": lambda args, attrs, context: (args[0] + args[1],),
    "MaxPool": _max_pool,
    "Resize": _resize,
    "Concat": lambda args, attrs, context: (torch.cat(args, dim=attrs["axis"]),),
    "Cast": _cast,
    "Identity": lambda args, attrs, context: (args[0],),
    "Constant": lambda args, attrs, context: (attrs["value"],),
    "Shape": lambda args, attrs, context: (torch.tensor(args[0].shape, dtype=torch.int64),),
    "Slice": _slice,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
}


def supported_ops() -> frozenset[str]:
    """The ONNX ops this converter runs (a graph with any other op stays on onnxruntime)."""
    return frozenset(_OPS)
