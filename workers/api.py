"""The typed Python API: ``cutout.remove_background(...)`` and a reusable ``cutout.Session``.

Why a module of its own: the pipeline speaks ``PipelineOptions``; a library user wants named
keyword parameters their editor can complete, any kind of image in (a path, bytes, an array,
a PIL image, an ``s3://`` or ``http(s)://`` URI) and a session that keeps its model loaded.
Every parameter left as ``None`` keeps the pipeline's default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import numpy as np

from cutout.jobs.errors import ConfigError, CutoutError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.pipeline import CutoutResult, Pipeline
from cutout.workers.stages import run_stage

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray, Any]
_REMOTE_SCHEMES = ("s3://", "http://", "https://", "file://")


@dataclass
class _Prepared:
    """One input made ready for the model: RGB, the alpha it carried, a name for errors."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    name: str
    notes: tuple[str, ...] = ()


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
        crop: bool | None = None,
        device: str | None = None,
        options: PipelineOptions | None = None,
    ):
        chosen = {
            "preset": preset, "model": model, "fusion": fusion, "model_sizes": model_sizes,
            "weights": weights, "classes": classes, "seg_size": seg_size,
            "refine": refine, "trimap_band": trimap_band, "matting": matting,
            "background": background, "format": format, "quality": quality,
            "max_pixels": max_pixels, "crop": crop,
        }
        self.options = _options(options, {k: v for k, v in chosen.items() if v is not None})
        self.pipeline = Pipeline(self.options, device=device)

    def remove(self, image: ImageInput, *, trimap: np.ndarray | None = None,
               box: Sequence[float] | None = None) -> CutoutResult:
        """One image → its cutout. Raises a typed ``CutoutError`` (labelled with its stage).

        ``box`` ``(x, y, w, h)`` in pixels cuts out the object in that box (cutout.workers.boxes):
        at the input's size with alpha zero outside it, or the box alone with ``crop=True``.
        """
        timings: dict[str, float] = {}
        prepared = _prepare(image, self.options.max_pixels, timings)
        if box is not None:
            return self._remove_box(prepared, box, timings)
        (mask,) = self.pipeline.masks([prepared.rgb], [timings])
        if trimap is not None:
            from cutout.workers.trimap import normalise_trimap

            trimap = run_stage(timings, "trimap", normalise_trimap, trimap, prepared.rgb.shape[:2])
        return self._finish(prepared, mask, timings, trimap)

    def remove_many(self, images: Iterable[ImageInput]) -> list[CutoutResult | CutoutError]:
        """A batch: the good inputs go through the model together; a bad one gets its error
        in its place in the list and never fails its neighbours."""
        results: list[CutoutResult | CutoutError] = []
        ready: dict[int, tuple[_Prepared, dict[str, float]]] = {}
        for index, image in enumerate(images):
            results.append(CutoutError("not processed"))
            timings: dict[str, float] = {}
            try:
                ready[index] = (_prepare(image, self.options.max_pixels, timings), timings)
            except CutoutError as exc:
                results[index] = exc
        if not ready:
            return results
        masks = self.pipeline.masks([item.rgb for item, _ in ready.values()],
                                    [timings for _, timings in ready.values()])
        for (index, (item, timings)), mask in zip(ready.items(), masks):
            try:
                results[index] = self._finish(item, mask, timings)
            except CutoutError as exc:
                results[index] = exc
        return results

    def _remove_box(self, prepared: "_Prepared", box, timings: dict[str, float]) -> CutoutResult:
        from cutout.workers.boxes import box_region, cut_out_box

        height, width = prepared.rgb.shape[:2]
        region = run_stage(timings, "box", box_region, box, width, height)
        result = cut_out_box(self.pipeline, prepared.rgb, region, input_alpha=prepared.alpha,
                             crop_output=self.options.crop)
        result.timings = {**timings, **result.timings}
        result.notes = list(prepared.notes) + result.notes
        return result

    def _finish(self, prepared: "_Prepared", mask: np.ndarray, timings: dict[str, float],
                trimap: np.ndarray | None = None) -> CutoutResult:
        """Trimap → matte → composite; the result carries every stage's seconds and the notes
        decoding left (an ignored ICC profile, say)."""
        result = self.pipeline.finish(prepared.rgb, mask, input_alpha=prepared.alpha, trimap=trimap)
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        result.timings = timings
        result.notes = list(prepared.notes) + result.notes
        return result


_SESSIONS: dict[tuple, Session] = {}


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
    crop: bool | None = None,
    device: str | None = None,
    trimap: np.ndarray | None = None,
    box: Sequence[float] | None = None,
) -> CutoutResult:
    """One call, one image: ``cutout.remove_background("cat.jpg", background="blur:25")``.

    The session behind it is kept per settings, so calling it in a loop loads the model once.
    ``trimap`` (gray, 0 bg / 128 unknown / 255 fg) replaces the one built from the mask.
    ``box=(x, y, w, h)`` (pixels) cuts out the object in the box; ``crop=True`` returns just
    the box with its margin.
    """
    settings = dict(
        preset=preset, model=model, fusion=fusion,
        model_sizes=",".join(f"{k}={v}" for k, v in sorted(model_sizes.items()))
        if isinstance(model_sizes, dict) else model_sizes,
        weights=weights, classes=tuple(classes) if classes else None,
        seg_size=seg_size, refine=refine, trimap_band=trimap_band, matting=matting,
        background=background, format=format, quality=quality, max_pixels=max_pixels,
        crop=crop, device=device,
    )
    key = tuple(sorted(settings.items()))
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = Session(**settings)
    return session.remove(image, trimap=trimap, box=box)


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


def _prepare(image: ImageInput, max_pixels: int, timings: dict[str, float]) -> _Prepared:
    """Any supported input → RGB (+ the alpha it carried); decoding is timed as its stage."""
    from cutout.workers.decode import decode_image

    if isinstance(image, np.ndarray):
        rgb, alpha = _split_array(image)
        return _Prepared(rgb, alpha, "array")
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        mode = "RGBA" if "A" in image.getbands() else "RGB"
        rgb, alpha = _split_array(np.asarray(image.convert(mode)))
        return _Prepared(rgb, alpha, "PIL image")
    if isinstance(image, (bytes, bytearray)):
        data, name = bytes(image), ""
    elif isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        data = _read(name)
    else:
        raise ConfigError(
            f"unsupported image input {type(image).__name__}: give a path, URI, bytes, "
            "a uint8 array or a PIL image"
        )
    decoded = run_stage(timings, "decode", decode_image, data, max_pixels=max_pixels, name=name)
    return _Prepared(decoded.rgb, decoded.alpha, name or "bytes", tuple(decoded.notes))


def _read(name: str) -> bytes:
    """Local paths with the caller's own rights; URIs through cutout's storage layer."""
    if name.startswith(_REMOTE_SCHEMES):
        from cutout.jobs import storage

        return storage.read_bytes(name)
    with open(name, "rb") as handle:
        return handle.read()


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
