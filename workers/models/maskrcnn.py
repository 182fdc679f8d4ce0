"""Mask R-CNN (torchvision ``maskrcnn_resnet50_fpn_v2``, COCO categories): instance masks.

Instances of the chosen classes with score ≥ ``options.score_threshold`` are collapsed by
pixel-wise max into one soft mask. Default class: ``person`` only — on ordinary photos
"every COCO object" also keeps chairs, cups and cars in the background, which is rarely the
cut-out anyone wants; pass ``classes`` to choose others. An image with no such instance gets
an all-zero mask. Images go in at their own size; the model's transform resizes the short
side to ``seg_size`` (default 800, torchvision's own) and pastes masks back at full size.
"""
from __future__ import annotations

import numpy as np

from cutout.workers.models.base import check_images, max_batch, prepare_torch, translate_oom
from cutout.workers.models.registry import ModelSpec, register_model, resolve_classes
from cutout.workers.models.torchvision_semantic import torchvision_weights_spec

COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

MASKRCNN_WEIGHTS = torchvision_weights_spec(
    "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
    177.219,
    COCO_CATEGORIES,
    800,
    (0.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    "Input is RGB in 0..1; the model normalises (ImageNet mean/std) and resizes internally.",
)


@register_model("maskrcnn")
def _maskrcnn() -> ModelSpec:
    return ModelSpec(
        name="maskrcnn",
        family="torchvision-detection",
        description="Mask R-CNN ResNet-50 FPN v2 (COCO): instances of chosen classes, default person.",
        builder=build_maskrcnn,
        weights=MASKRCNN_WEIGHTS,
        input_size=800,
        takes_classes=True,
        default_classes=("person",),
    )


def build_maskrcnn_module(min_size: int = 800):
    """The bare network (no download); ``min_size`` is the short side it resizes to."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    max_size = max(min_size, round(min_size * 1333 / 800))
    return maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=len(COCO_CATEGORIES), min_size=min_size, max_size=max_size
    )


def build_maskrcnn(spec: ModelSpec, options, device: str) -> "MaskRcnnSegmenter":
    import torch

    from cutout.workers.models.weights import locate_weights

    prepare_torch(device)
    classes = resolve_classes(spec, options.classes)
    module = build_maskrcnn_module(options.seg_size or spec.input_size)
    state = torch.load(str(locate_weights(spec, options.weights)), map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    labels = sorted({i for i, name in enumerate(COCO_CATEGORIES) if name in classes})
    return MaskRcnnSegmenter(spec, module.eval().to(device), labels, options.score_threshold, device)


def collapse_instances(masks: np.ndarray, labels: np.ndarray, scores: np.ndarray, wanted, threshold: float, shape):
    """Pixel-wise max of the soft masks (N×H×W) whose label is wanted and score ≥ threshold."""
    keep = np.isin(labels, list(wanted)) & (scores >= threshold)
    if not keep.any():
        return np.zeros(shape, dtype=np.float32)
    return np.clip(masks[keep].max(axis=0), 0.0, 1.0).astype(np.float32)


class MaskRcnnSegmenter:
    def __init__(self, spec: ModelSpec, module, labels: list[int], threshold: float, device: str):
        self.name = spec.name
        self.module = module
        self.labels = labels
        self.threshold = threshold
        self.device = device
        self.input_size = module.transform.min_size[0]
        self.batch_size = max_batch(device)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        check_images(images)
        masks: list[np.ndarray] = []
        with translate_oom(self.device, self.name):
            for start in range(0, len(images), self.batch_size):
                masks.extend(self._forward(images[start : start + self.batch_size]))
        return masks

    def _forward(self, images: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            tensors = [torch.from_numpy(image).to(self.device).permute(2, 0, 1).float() / 255.0 for image in images]
            outputs = self.module(tensors)
        return [
            collapse_instances(
                out["masks"][:, 0].float().cpu().numpy(),
                out["labels"].cpu().numpy(),
                out["scores"].float().cpu().numpy(),
                self.labels,
                self.threshold,
                image.shape[:2],
            )
            for out, image in zip(outputs, images)
        ]
