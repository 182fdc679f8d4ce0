"""The typed Python API: ``cutout.remove_background(...)`` and a reusable ``cutout.Session``.

Why a module of its own: the pipeline speaks ``PipelineOptions``; a library user wants named
keyword parameters their editor can complete, any kind of image in (a path, bytes, an array,
a PIL image, an ``s3://`` or ``http(s)://`` URI) and a session that keeps its model loaded.
Every parameter left as ``None`` keeps the pipeline's default.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Iterable, Sequence, Union

import numpy as np

from cutout.jobs.errors import ConfigError, CutoutError
from cutout.jobs.spec import PipelineOptions, user_option_fields
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

    def __init__(self, *, device: str | None = None, options: PipelineOptions | None = None,
                 **pipeline_options: Any):
        """Keywords: every user-facing ``PipelineOptions`` field (see the signature), over
        ``options`` when given; ``None`` keeps the default. An unknown keyword is a TypeError.
        """
        self.options = _options(options, _chosen("Session", pipeline_options))
        self.pipeline = MODEL_CACHE.pipeline(self.options, device)

    def remove(self, image: ImageInput, *, trimap: np.ndarray | None = None,
               box: Sequence[float] | None = None) -> CutoutResult:
        """One image → its cutout. Raises a typed ``CutoutError`` (labelled with its stage).
        ``trimap`` (gray, 0 bg / 128 unknown / 255 fg) replaces segmentation for this image;
        ``box`` ``(x, y, w, h)`` in pixels cuts out the object in that box (at the input's size,
        alpha zero outside it; just the box and its margin with ``crop=True``)."""
        (result,) = self._run([image], [trimap], [box])
        if isinstance(result, CutoutError):
            raise result
        return result

    def remove_many(self, images: Iterable[ImageInput]) -> list[CutoutResult | CutoutError]:
        """A batch: the good inputs go through the model together; a bad one (unreadable,
        undecodable, failing a stage) gets its error in its place in the list and never fails
        its neighbours."""
        images = list(images)
        return self._run(images, [None] * len(images))

    def _run(self, images: list, trimaps: list, boxes: list | None = None) -> list[CutoutResult | CutoutError]:
        """The pipeline's driver over the inputs that could be read; the others keep their
        error in their slot."""
        slots = [_prepare(image, trimap) for image, trimap in zip(images, trimaps)]
        for slot, box in zip(slots, boxes or []):
            if box is not None and isinstance(slot, PipelineInput):
                slot.box = tuple(box)
        ready = [slot for slot in slots if isinstance(slot, PipelineInput)]
        outcomes = iter(self.pipeline.run(ready, encode=False, keep_result=True))
        return [slot if isinstance(slot, CutoutError) else _result(next(outcomes)) for slot in slots]


def remove_background(image: ImageInput, *, device: str | None = None, trimap: np.ndarray | None = None,
                      box: Sequence[float] | None = None, **pipeline_options: Any) -> CutoutResult:
    """One call, one image: ``cutout.remove_background("cat.jpg", background="blur:25")``.

    Keywords: every user-facing pipeline option (see the signature). The model stays loaded in
    the process cache, so calling it in a loop loads it once.
    ``trimap`` (gray, 0 bg / 128 unknown / 255 fg) replaces the one built from the mask.
    ``box=(x, y, w, h)`` (pixels) cuts out the object in that box; ``crop=True`` returns just
    the box with its margin.
    """
    options = _options(None, _chosen("remove_background", pipeline_options))
    return Session(device=device, options=options).remove(image, trimap=trimap, box=box)


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
