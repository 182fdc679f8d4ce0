"""The typed Python API: ``cutout.remove_background(...)`` and a reusable ``cutout.Session``.

Why a module of its own: the pipeline speaks ``PipelineOptions``; a library user wants named
keyword parameters their editor can complete, any kind of image in (a path, bytes, an array,
a PIL image, an ``s3://`` or ``http(s)://`` URI) and a session that keeps its model loaded.
Every parameter left as ``None`` keeps the pipeline's default.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Iterable, Union

import numpy as np

from cutout.jobs.errors import ConfigError, CutoutError
from cutout.jobs.spec import PipelineOptions, user_option_fields
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

    def __init__(self, *, device: str | None = None, options: PipelineOptions | None = None,
                 **pipeline_options: Any):
        """Keywords: every user-facing ``PipelineOptions`` field (see the signature), over
        ``options`` when given; ``None`` keeps the default. An unknown keyword is a TypeError.
        """
        self.options = _options(options, _chosen("Session", pipeline_options))
        self.pipeline = Pipeline(self.options, device=device)

    def remove(self, image: ImageInput, *, trimap: np.ndarray | None = None) -> CutoutResult:
        """One image → its cutout. Raises a typed ``CutoutError`` (labelled with its stage)."""
        timings: dict[str, float] = {}
        prepared = _prepare(image, self.options.max_pixels, timings)
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


def remove_background(image: ImageInput, *, device: str | None = None, trimap: np.ndarray | None = None,
                      **pipeline_options: Any) -> CutoutResult:
    """One call, one image: ``cutout.remove_background("cat.jpg", background="blur:25")``.

    Keywords: every user-facing pipeline option (see the signature). The session behind it is
    kept per resolved options and device, so calling it in a loop loads the model once.
    ``trimap`` (gray, 0 bg / 128 unknown / 255 fg) replaces the one built from the mask.
    """
    options = _options(None, _chosen("remove_background", pipeline_options))
    key = (options.config_hash(), device)
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = Session(device=device, options=options)
    return session.remove(image, trimap=trimap)


def _chosen(function: str, keywords: dict[str, Any]) -> dict[str, Any]:
    """The pipeline keywords given (not None); one outside the schema is a TypeError, as for
    any Python function, so a typo never silently keeps a default."""
    fields = user_option_fields()
    for name in keywords:
        if name not in fields:
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")
    return {name: value for name, value in keywords.items() if value is not None}


def _options(base: PipelineOptions | None, chosen: dict) -> PipelineOptions:
    """Explicit parameters over ``base`` (or the defaults), validated once; over ``base`` they
    act as ``redo``'s overrides do (a new preset or model refills what the old preset chose)."""
    from pydantic import ValidationError

    from cutout.jobs.cli_options import validation_message

    if base is not None and not chosen:
        return base
    try:
        return base.with_overrides(chosen) if base is not None else PipelineOptions(**chosen)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from exc


def _keyword_signature(function, *leading: str) -> inspect.Signature:
    """``function``'s signature with one keyword per user-facing pipeline option, so help(),
    editors and ``inspect`` show every option the schema has."""
    own = inspect.signature(function).parameters
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=info.annotation | None)
               for name, info in user_option_fields().items()]
    head = [own[name] for name in leading]
    tail = [param for name, param in own.items() if name not in leading and param.kind != param.VAR_KEYWORD]
    return inspect.Signature([*head, *options, *tail], return_annotation=inspect.signature(function).return_annotation)


def _options_doc() -> str:
    return "\n    Pipeline options (keywords; None keeps the schema's or the preset's default):\n" + "\n".join(
        f"        {name}: {info.description}" for name, info in user_option_fields().items())


Session.__init__.__signature__ = _keyword_signature(Session.__init__, "self")
Session.__init__.__doc__ += _options_doc()
remove_background.__signature__ = _keyword_signature(remove_background, "image")
remove_background.__doc__ += _options_doc()


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
