"""torchvision semantic segmentation (PASCAL VOC, 21 categories): DeepLabV3 and LR-ASPP.

The soft mask is the sum of the softmax probabilities of the chosen classes (default: all
20 non-background classes, i.e. ``1 - p(background)``). The weights metadata below copies
torchvision's ``*_Weights.COCO_WITH_VOC_LABELS_V1`` enums (url, hash prefix, transforms,
categories) so that listing models never imports torch; a test checks they agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cutout.workers.models.base import BatchedSegmenter, prepare_torch
from cutout.workers.models.registry import ModelSpec, WeightsSpec, register_model, resolve_classes

VOC_CATEGORIES = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_LICENCE = "BSD-3-Clause (torchvision); trained on COCO (CC-BY-4.0 annotations)"


@dataclass(frozen=True)
class _Variant:
    name: str
    constructor: str  # function in torchvision.models.segmentation
    url: str
    size_mb: float
    description: str


_VARIANTS = (
    _Variant(
        "deeplabv3-resnet101",
        "deeplabv3_resnet101",
        "https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth",
        233.217,
        "DeepLabV3 ResNet-101, VOC classes: accurate, slow on CPU.",
    ),
    _Variant(
        "deeplabv3-mobilenet-v3",
        "deeplabv3_mobilenet_v3_large",
        "https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        42.301,
        "DeepLabV3 MobileNetV3-Large, VOC classes: fast.",
    ),
    _Variant(
        "lraspp-mobilenet-v3",
        "lraspp_mobilenet_v3_large",
        "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth",
        12.49,
        "LR-ASPP MobileNetV3-Large, VOC classes: fastest, coarse edges.",
    ),
)


def torchvision_weights_spec(url: str, size_mb: float, categories, input_size, mean, std, notes) -> WeightsSpec:
    """A spec for a torchvision checkpoint: its file name carries the sha256 prefix."""
    filename = url.rsplit("/", 1)[1]
    return WeightsSpec(
        filename=filename,
        sources=(url,),
        sha256=filename.rsplit("-", 1)[1].split(".")[0],
        size_bytes=None,
        input_size=input_size,
        mean=mean,
        std=std,
        categories=tuple(categories),
        licence=TORCHVISION_LICENCE,
        notes=f"about {size_mb} MB; sha256 is torchvision's file-name prefix. {notes}".strip(),
    )


def _register(variant: _Variant) -> None:
    weights = torchvision_weights_spec(
        variant.url, variant.size_mb, VOC_CATEGORIES, 520, IMAGENET_MEAN, IMAGENET_STD,
        "torchvision resizes the short side to 520; we resize to a square of seg_size (default 520).",
    )  # fmt: skip

    @register_model(variant.name)
    def _spec() -> ModelSpec:
        return ModelSpec(
            name=variant.name,
            family="torchvision-semantic",
            description=variant.description,
            builder=build_semantic,
            weights=weights,
            input_size=520,
            takes_classes=True,
            default_classes=VOC_CATEGORIES[1:],
        )


for _variant in _VARIANTS:
    _register(_variant)

_CONSTRUCTORS = {variant.name: variant.constructor for variant in _VARIANTS}


def build_torchvision_module(name: str):
    """The bare network for ``name`` (no aux head, no download): what a checkpoint loads into."""
    from torchvision.models import segmentation

    constructor = getattr(segmentation, _CONSTRUCTORS[name])
    kwargs = {"aux_loss": False} if name.startswith("deeplabv3") else {}
    return constructor(weights=None, weights_backbone=None, num_classes=len(VOC_CATEGORIES), **kwargs)


def load_state_dict(path) -> dict:
    """A checkpoint's tensors without the auxiliary head (we never use its output)."""
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if not key.startswith("aux_classifier.")}


def build_semantic(spec: ModelSpec, options, device: str) -> "SemanticSegmenter":
    from cutout.workers.models.weights import locate_weights

    prepare_torch(device)
    classes = resolve_classes(spec, options.classes)
    module = build_torchvision_module(spec.name)
    module.load_state_dict(load_state_dict(locate_weights(spec, options.weights)))
    indices = [spec.weights.categories.index(name) for name in classes]
    return SemanticSegmenter(spec, module.eval().to(device), indices, options.seg_size or spec.input_size, device)


def class_probability(logits, indices: list[int]):
    """Softmax over classes, then the summed probability of ``indices``: N×C×H×W → N×H×W."""
    return logits.softmax(dim=1)[:, indices].sum(dim=1).clamp_(0.0, 1.0)


class SemanticSegmenter(BatchedSegmenter):
    def __init__(self, spec: ModelSpec, module, indices: list[int], size: int, device: str):
        super().__init__(spec, size, device)
        self.module = module
        self.indices = indices

    def forward(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.module(torch.from_numpy(batch).to(self.device))["out"]
            return class_probability(logits, self.indices).float().cpu().numpy()
