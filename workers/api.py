"""The typed Python API: ``cutout.remove_background(...)`` and a reusable ``cutout.Session``.

Why a module of its own: the pipeline speaks ``PipelineOptions``; a library user wants named
keyword parameters their editor can complete, any kind of image in (a path, bytes, an array,
a PIL image, an ``s3://`` or ``http(s)://`` URI) and a session that keeps its model loaded.
Every parameter left as ``None`` keeps the pipeline's default.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence, Union

import numpy as np

from cutout.jobs.errors import ConfigError, CutoutError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.cache import MODEL_CACHE
from cutout.workers.pipeline import CutoutResult, PipelineInput
from cutout.workers.stages import stage_error

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray, Any]


class Session:
    """A pipeline with its options fixed and its model loaded once, for many calls.

    >>> session = Session(preset="fast", background="color:#ffffff")
    >>> result = session.remove("cat.jpg")           # or an array, bytes, PIL image, s3:// URI
    >>> results = session.remove_many(["a.jpg", "b.png"])   # one model batch
    """

    def __init__(
        self,
        *,
        preset: str | None = None,
        model: str | None = None,
        fusion: str | None = None,
        model_sizes: str | dict[str, int] | None = None,
        weights: str | None = None,
        classes: Sequence[str] | None = None,
        seg_size: int | None = None,
        refine: str | None = None,
        trimap_band: float | None = None,
        matting: str | None = None,
        background: str | None = None,
        format: str | None = None,
        quality: int | None = None,
        max_pixels: int | None = None,
        device: str | None = None,
        options: PipelineOptions | None = None,
    ):
        chosen = {
            "preset": preset, "model": model, "fusion": fusion, "model_sizes": model_sizes,
            "weights": weights, "classes": classes, "seg_size": seg_size,
            "refine": refine, "trimap_band": trimap_band, "matting": matting,
            "background": background, "format": format, "quality": quality,
            "max_pixels": max_pixels,
        }
        self.options = _options(options, {k: v for k, v in chosen.items() if v is not None})
        self.pipeline = MODEL_CACHE.pipeline(self.options, device)

    def remove(self, image: ImageInput, *, trimap: np.ndarray | None = None) -> CutoutResult:
        """One image → its cutout. Raises a typed ``CutoutError`` (labelled with its stage).
        ``trimap`` (gray, 0 bg / 128 unknown / 255 fg) replaces segmentation for this image."""
        (result,) = self._run([image], [trimap])
        if isinstance(result, CutoutError):
            raise result
        return result

    def remove_many(self, images: Iterable[ImageInput]) -> list[CutoutResult | CutoutError]:
        """A batch: the good inputs go through the model together; a bad one (unreadable,
        undecodable, failing a stage) gets its error in its place in the list and never fails
        its neighbours."""
        images = list(images)
        return self._run(images, [None] * len(images))

    def _run(self, images: list, trimaps: list) -> list[CutoutResult | CutoutError]:
        """The pipeline's driver over the inputs that could be read; the others keep their
        error in their slot."""
        slots = [_prepare(image, trimap) for image, trimap in zip(images, trimaps)]
        ready = [slot for slot in slots if isinstance(slot, PipelineInput)]
        outcomes = iter(self.pipeline.run(ready, encode=False, keep_result=True))
        return [slot if isinstance(slot, CutoutError) else _result(next(outcomes)) for slot in slots]


def remove_background(
    image: ImageInput,
    *,
    preset: str | None = None,
    model: str | None = None,
    fusion: str | None = None,
    model_sizes: str | dict[str, int] | None = None,
    weights: str | None = None,
    classes: Sequence[str] | None = None,
    seg_size: int | None = None,
    refine: str | None = None,
    trimap_band: float | None = None,
    matting: str | None = None,
    background: str | None = None,
    format: str | None = None,
    quality: int | None = None,
    max_pixels: int | None = None,
    device: str | None = None,
    trimap: np.ndarray | None = None,
) -> CutoutResult:
    """One call, one image: ``cutout.remove_background("cat.jpg", background="blur:25")``.

    The model stays loaded in the process cache, so calling it in a loop loads it once.
    ``trimap`` (gray, 0 bg / 128 unknown / 255 fg) replaces the one built from the mask.
    """
    settings = dict(
        preset=preset, model=model, fusion=fusion,
        model_sizes=",".join(f"{k}={v}" for k, v in sorted(model_sizes.items()))
        if isinstance(model_sizes, dict) else model_sizes,
        weights=weights, classes=tuple(classes) if classes else None,
        seg_size=seg_size, refine=refine, trimap_band=trimap_band, matting=matting,
        background=background, format=format, quality=quality, max_pixels=max_pixels,
        device=device,
    )
    return Session(**settings).remove(image, trimap=trimap)


def _options(base: PipelineOptions | None, chosen: dict) -> PipelineOptions:
    """Explicit parameters over ``base`` (or the defaults), validated once."""
    from pydantic import ValidationError

    from cutout.jobs.cli_options import validation_message

    if base is not None and not chosen:
        return base
    fields = {**base.model_dump(), **chosen} if base is not None else chosen
    try:
        return PipelineOptions(**fields)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from exc


def _prepare(image: ImageInput, trimap: np.ndarray | None) -> PipelineInput | CutoutError:
    """Any supported input → the driver's input (bytes it decodes, or an RGB array and the
    alpha it carried), or the typed error that keeps it out."""
    try:
        if isinstance(image, np.ndarray):
            rgb, alpha = _split_array(image)
            return PipelineInput("array", rgb=rgb, alpha=alpha, trimap=trimap)
        if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
            mode = "RGBA" if "A" in image.getbands() else "RGB"
            rgb, alpha = _split_array(np.asarray(image.convert(mode)))
            return PipelineInput("PIL image", rgb=rgb, alpha=alpha, trimap=trimap)
        if isinstance(image, (bytes, bytearray)):
            return PipelineInput("", bytes(image), trimap=trimap)
        if isinstance(image, (str, os.PathLike)):
            from cutout.jobs import storage  # local paths with the caller's own rights

            name = os.fspath(image)
            return PipelineInput(name, storage.read_bytes(name), trimap=trimap)
    except CutoutError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - one unreadable input never fails its neighbours
        return stage_error(exc, "decode")
    return ConfigError(
        f"unsupported image input {type(image).__name__}: give a path, URI, bytes, "
        "a uint8 array or a PIL image"
    )


def _result(outcome) -> CutoutResult | CutoutError:
    return outcome.result if outcome.ok else outcome.error


def _split_array(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 gray, RGB or RGBA array → RGB and (for RGBA) the alpha it carried."""
    if array.dtype != np.uint8:
        raise ConfigError(f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 2:
        return np.ascontiguousarray(np.stack([array] * 3, axis=-1)), None
    if array.ndim == 3 and array.shape[2] == 3:
        return np.ascontiguousarray(array), None
    if array.ndim == 3 and array.shape[2] == 4:
        from cutout.workers.decode import _split_alpha  # the same rule as decoded RGBA files

        return _split_alpha(array)
    raise ConfigError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
