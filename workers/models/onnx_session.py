"""Running an ONNX graph for a segmenter: in torch (``onnx_torch``: batched, CUDA) or onnxruntime.

``graph_forward`` returns a function float32 N×3×H×W → N×H×W (the first channel of the chosen
output) and the runtime and device it really runs on. Runtime ``auto`` means torch on CUDA when
our converter knows every op of the graph, else onnxruntime (its CUDA provider when installed,
else its CPU provider: the segmenter then reports device ``cpu``); on CPU it means onnxruntime
(about twice as fast as torch here).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from cutout.jobs.errors import ModelError
from cutout.workers.models.base import choose_runtime, cpu_threads, onnxruntime_has_cuda, prepare_torch, runtime_setting

Forward = Callable[[np.ndarray], np.ndarray]


def graph_forward(
    model, output: str, device: str, runtime: str | None = None, input_hw: tuple[int, int] | None = None
) -> tuple[Forward, str, str]:
    """(forward, runtime, device) for ``model``'s ``output``; ``input_hw`` fixes the input
    size for onnxruntime (None: the graph's own, possibly dynamic, size)."""
    runtime, device = plan_runtime(model, device, runtime or runtime_setting())
    if runtime == "torch":
        return torch_forward(model, output, device), runtime, device
    return onnxruntime_forward(model, output, input_hw, cuda=device != "cpu"), runtime, device


def plan_runtime(model, device: str, requested: str) -> tuple[str, str]:
    """The runtime and the device ``model`` will really run on (see the module docstring)."""
    chosen = choose_runtime(device, requested)
    if chosen == "torch":
        missing = unsupported_ops(model)
        if not missing:
            return "torch", device
        if requested != "auto":
            raise ModelError(f"runtime torch cannot run this graph: unsupported ONNX ops {', '.join(sorted(missing))}")
    on_cuda = device.startswith("cuda") and onnxruntime_has_cuda()
    return "onnxruntime", device if on_cuda else "cpu"


def unsupported_ops(model) -> set[str]:
    """ONNX ops of ``model`` that the torch converter does not implement."""
    from cutout.workers.models.onnx_torch import supported_ops

    return {node.op_type for node in model.graph.node} - supported_ops()


def torch_forward(model, output: str, device: str) -> Forward:
    import torch

    from cutout.workers.models.onnx_torch import OnnxGraphModule

    prepare_torch(device)
    module = OnnxGraphModule(model, outputs=[output]).eval().to(device, memory_format=torch.channels_last)

    def forward(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(device).contiguous(memory_format=torch.channels_last)
            return module(x)[:, 0].float().cpu().numpy()

    return forward


def onnxruntime_forward(model, output: str, input_hw: tuple[int, int] | None, cuda: bool = False) -> Forward:
    import onnxruntime as ort

    from cutout.workers.models.onnx_torch import prepared_for_onnxruntime

    prepared = prepared_for_onnxruntime(model, [output], input_hw)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: ORT warns about every pruned constant
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(prepared.SerializeToString(), options, providers=providers)
    input_name = session.get_inputs()[0].name

    def forward(batch: np.ndarray) -> np.ndarray:
        (mask,) = session.run([output], {input_name: batch})
        return mask[:, 0].astype(np.float32, copy=False)

    return forward


def load_graph(spec, options):
    """The ONNX graph of ``spec``'s weights (``options.weights`` overrides the models dir)."""
    import onnx

    from cutout.workers.models.weights import locate_weights

    return onnx.load(str(locate_weights(spec, options.weights)))
