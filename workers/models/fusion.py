"""Fused models: ``A+B`` (e.g. ``isnet-general+modnet``) runs each registered model on the batch
and combines their soft masks pixel by pixel.

Rules (``PipelineOptions.fusion``): ``max`` (the default) keeps a pixel when any model is sure
of it — it fills what one network misses (IS-Net's grey fur, MODNet's missed objects); ``mean``
averages, so both must agree. The components' raw outputs are fused (no per-model ``mask_ramp``);
the pipeline then applies the fused model's ramp: ``options.mask_ramp``, default none.

Sizes: each component runs one pass at ``options.model_sizes[name]`` if set, else at
``options.seg_size`` if set, else at its own default ``input_size`` (no multi-size ensemble).
Components come from the process cache (``cutout.workers.models.cache``): each loads once.
Each fused mask also says how far its models disagreed (``FusedMask.disagreement``: 1 - IoU of
their masks >= 0.5), a second opinion the fusion computes anyway: the cascade reruns an output
whose models disagree (``escalate_apart``).
Nothing here imports torch.
"""
from __future__ import annotations

import numpy as np

from cutout.jobs.errors import ConfigError

RULES = ("max", "mean")
DEFAULT_RULE = "max"


def fusion_spec(name: str):
    """The ``ModelSpec`` of a fused name, built from its registered components."""
    from cutout.workers.models.registry import ModelSpec, get_model_spec

    components = [part.strip() for part in name.split("+")]
    if len(set(components)) != len(components) or not all(components):
        raise ConfigError(f"fused model {name!r}: name two or more different models, e.g. isnet-general+modnet")
    specs = [get_model_spec(part) for part in components]  # unknown names raise here
    takes_classes = any(spec.takes_classes for spec in specs)
    return ModelSpec(
        name=name,
        family="fusion",
        description=f"pixel-wise fusion (max or mean) of {', '.join(components)}",
        builder=build_fusion,
        takes_classes=takes_classes,
        default_classes=tuple(c for spec in specs for c in spec.default_classes),
        components=tuple(components),
    )


def build_fusion(spec, options, device: str) -> "FusionSegmenter":
    from cutout.workers.models.cache import MODEL_CACHE

    components = []
    for name in spec.components:
        component = MODEL_CACHE.component(component_options(options, name), device)
        components.append(component)
    return FusionSegmenter(spec.name, components, options.fusion or DEFAULT_RULE)


def component_options(options, name: str):
    """The options one component of a fused model is built with (see the module docstring)."""
    from cutout.workers.models.registry import get_model_spec

    classes = options.classes if get_model_spec(name).takes_classes else ()
    return options.model_copy(
        update={"model": name, "seg_size": options.model_size(name), "model_sizes": (), "fusion": None, "classes": classes}
    )


def fuse(masks: list[np.ndarray], rule: str) -> np.ndarray:
    """Combine same-sized float masks in 0..1 by ``rule`` (``max`` or ``mean``)."""
    stack = np.stack(masks).astype(np.float32, copy=False)
    if rule == "max":
        return stack.max(axis=0)
    if rule == "mean":
        return stack.mean(axis=0, dtype=np.float32)
    raise ConfigError(f"unknown fusion rule {rule!r}; rules: {', '.join(RULES)}")


class FusedMask(np.ndarray):
    """A fused soft mask (a plain float array to every reader) that carries its models'
    disagreement, 1 - IoU of their masks >= 0.5 (0 when they keep the same pixels)."""

    disagreement: float = 0.0


def disagreement(masks: list[np.ndarray]) -> float:
    """1 - IoU of the masks' kept pixels (>= 0.5): 0 when every model keeps the same ones."""
    kept = [mask >= 0.5 for mask in masks]
    union = np.logical_or.reduce(kept)
    total = int(np.count_nonzero(union))
    return 1.0 - int(np.count_nonzero(np.logical_and.reduce(kept))) / total if total else 0.0


def fuse_with_disagreement(masks: list[np.ndarray], rule: str) -> FusedMask:
    fused = fuse(masks, rule).view(FusedMask)
    fused.disagreement = disagreement(masks)
    return fused


class FusionSegmenter:
    """Each component predicts the whole batch (batched as it likes), then masks are fused."""

    def __init__(self, name: str, components: list, rule: str):
        if rule not in RULES:
            raise ConfigError(f"unknown fusion rule {rule!r}; rules: {', '.join(RULES)}")
        self.name = name
        self.components = components
        self.rule = rule
        devices = [c.device for c in components if c.device != "cpu"]
        self.device = devices[0] if devices else "cpu"

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        per_model = [component.predict(images) for component in self.components]
        return [fuse_with_disagreement(list(masks), self.rule) for masks in zip(*per_model)]
