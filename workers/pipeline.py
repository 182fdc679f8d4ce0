"""The whole image pipeline as plain code: decode → segment → calibrate → select → refine →
trimap → matte → objects → foreground → composite → encode (``select`` only with
``select_by``; ``objects``: the main object kept when several were, ``cutout.workers.objects``).

``Pipeline`` holds the options and gets its segmenters from the process cache
(``workers/models/cache.py``). ``Pipeline.run`` is the one batch driver: the item loop
(shards and ``cutout run``), the Python API and ``cutout eval`` are adapters over it, so
every caller gets the same per-input isolation (one bad image never fails its neighbours).
Every stage runs through ``cutout.workers.stages.run_stage``, which times it and names it in a
failure.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cutout.jobs.errors import CutoutError, OutOfMemoryError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.stages import run_stage

# When a fused model's networks disagree and the photo was rerun, the rerun's output is kept
# unless the first scores higher by more than this. Chosen with the cascade's thresholds by the
# nested CV priced per photo (benchmarks/quality_cv.py --stage-cpu, among "the higher score",
# margins 0.1, 0.2, 0.3, "always the rerun's" and "straight to the rerun"): docs/results.md.
APART_KEEP_MARGIN = 0.1


@dataclass
class CutoutResult:
    """Everything one image produced, for callers that want arrays rather than bytes."""

    image: np.ndarray  # composited uint8: HxWx4, HxWx3 or HxW (mask)
    alpha: np.ndarray  # float32 HxW, final alpha
    mask: np.ndarray  # float32 HxW, the mask matting started from (calibrated, refined)
    trimap: np.ndarray | None  # uint8 HxW, None when matting is "none"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)  # see cutout.workers.quality
    flags: list[str] = field(default_factory=list)
    raw_mask: np.ndarray | None = None  # float32 HxW, the model's mask before calibration


@dataclass
class PipelineInput:
    """One input of ``Pipeline.run``: encoded bytes (decoded by the pipeline) or a uint8 RGB
    array (with the alpha it carried); ``trimap`` (encoded gray bytes or a uint8 array, 0 bg /
    128 unknown / 255 fg) replaces segmentation for this input; ``box`` (a
    ``cutout.jobs.boxes.BoxHint`` or ``(x, y, w, h)`` pixels) cuts out the object in that box
    (``cutout.workers.boxes``). Inputs that share one ``data`` object are decoded once."""

    name: str
    data: bytes | None = None
    rgb: np.ndarray | None = None
    alpha: np.ndarray | None = None
    trimap: bytes | np.ndarray | None = None
    box: object | None = None


@dataclass
class ItemOutcome:
    """One input's fate in ``Pipeline.run``: encoded bytes (and/or the arrays) or a typed error."""

    ok: bool
    data: bytes | None = None
    extension: str = ""
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    error: CutoutError | None = None
    quality: dict[str, float] = field(default_factory=dict)  # of a done output
    flags: list[str] = field(default_factory=list)
    result: CutoutResult | None = None  # the arrays, when ``run`` was asked to keep them


@dataclass
class _Image:
    """A decoded input: what segmentation and ``finish`` work on."""

    rgb: np.ndarray
    alpha: np.ndarray | None


def _as_error(exc: Exception, stage: str) -> CutoutError:
    """Wrap an unexpected exception so that it becomes a record, not a crash."""
    if isinstance(exc, CutoutError):
        return exc
    error = CutoutError(f"{type(exc).__name__}: {exc}", stage=stage)
    error.permanent = True
    return error


class Pipeline:
    """Runs the pipeline for one set of options; loads the model once, on first use."""

    def __init__(
        self,
        options: PipelineOptions | None = None,
        *,
        device: str | None = None,
        read_uri: Callable[[str], bytes] | None = None,
        nested: bool = False,
    ):
        self.options = options or PipelineOptions()
        self.device = device
        self.nested = nested  # a cascade's second pipeline: its models join the job's, none dropped
        self.background = self.options.parsed_background()
        self._read_uri = read_uri
        self._background_image: np.ndarray | None = None
        self._escalation: Pipeline | None = None  # the cascade's costlier pipeline, built on first use

    # --- stages ------------------------------------------------------------------------------
    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Calibrated soft masks for a batch (see ``mask_ramp``)."""
        return [self.calibrate(mask) for mask in self.segment_raw(images)]

    def calibrate(self, mask: np.ndarray) -> np.ndarray:
        """Map the model's soft output through its ramp: [low, high] → [0, 1]."""
        low, high = self.mask_ramp
        if (low, high) == (0.0, 1.0):
            return mask
        return np.clip((mask - low) / (high - low), 0.0, 1.0).astype(np.float32)

    @property
    def mask_ramp(self) -> tuple[float, float]:
        if self.options.mask_ramp is not None:
            return self.options.mask_ramp
        from cutout.workers.models.registry import get_model_spec

        return get_model_spec(self.options.model).mask_ramp

    @property
    def refine_method(self) -> str:
        if self.options.refine != "auto":
            return self.options.refine
        from cutout.workers.models.registry import get_model_spec

        return get_model_spec(self.options.model).default_refine

    @property
    def seg_sizes(self) -> tuple[int | None, ...]:
        """One pass at the user's seg_size, else the preset's sizes, else the model's ensemble
        sizes (or its default)."""
        if self.options.seg_size:
            return (self.options.seg_size,)
        if self.options.seg_sizes:
            return self.options.seg_sizes
        from cutout.workers.models.registry import get_model_spec

        return get_model_spec(self.options.model).ensemble_sizes or (None,)

    def load_models(self) -> float:
        """Load every segmenter this pipeline uses now rather than on the first image; seconds."""
        from cutout.workers.segment import get_segmenter

        start = time.perf_counter()
        for size in self.seg_sizes:
            get_segmenter(self.options.model_copy(update={"seg_size": size}), device=self.device)
        if self.options.select_by:
            self._class_segmenter()
        return time.perf_counter() - start

    def select(self, rgb: np.ndarray, mask: np.ndarray, notes: list[str]) -> np.ndarray:
        """With ``select_by`` (callers check it): only the salient mask's objects that the class
        model's mask claims (``cutout.workers.select``); a note says what was kept."""
        from cutout.workers.select import select_by_class

        class_mask = self._class_segmenter().predict([rgb])[0]
        selected, note = select_by_class(mask, class_mask)
        classes = ",".join(self.options.classes) or "its default classes"
        notes.append(f"select-by {self.options.select_by} ({classes}): {note}")
        return selected

    @staticmethod
    def _keep_main_object(alpha: np.ndarray, notes: list[str]) -> np.ndarray:
        """Only the main object where the kept area falls apart into parts of similar size
        (``cutout.workers.objects``); a note says so."""
        from cutout.workers.objects import keep_main_object

        alpha, note = keep_main_object(alpha)
        if note:
            notes.append(note)
        return alpha

    def _class_segmenter(self):
        """The ``select_by`` class model at its own input size, loaded beside the salient model
        (the same job's models in ``MODEL_CACHE``: nothing is dropped for it)."""
        from cutout.workers.models.cache import MODEL_CACHE

        class_options = self.options.model_copy(update={
            "model": self.options.select_by, "select_by": None, "seg_size": None, "seg_sizes": None,
            "weights": None, "fusion": None, "model_sizes": ()})
        return MODEL_CACHE.component(class_options, self.device)

    def segment_raw(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The model's soft masks over ``seg_sizes``, combined by ``options.size_rule``."""
        per_size = [self.segment_at(images, size) for size in self.seg_sizes]
        if len(per_size) == 1:
            return per_size[0]
        combine = np.max if self.options.size_rule == "max" else np.mean
        return [combine(masks, axis=0).astype(np.float32) for masks in zip(*per_size)]

    def segment_at(self, images: list[np.ndarray], size: int | None) -> list[np.ndarray]:
        """One size; on device OOM retry one by one, then at half the size, then on CPU."""
        options = self.options.model_copy(update={"seg_size": size})
        try:
            return self._segmenter(options).predict(images)
        except OutOfMemoryError:
            if len(images) > 1:
                return [self.segment_at([image], size)[0] for image in images]
            return [self._segment_after_oom(images[0], options)]

    def _segmenter(self, options: PipelineOptions):
        from cutout.workers.models.cache import MODEL_CACHE
        from cutout.workers.segment import get_segmenter

        if self.nested:
            return MODEL_CACHE.component(options, self.device)
        return get_segmenter(options, device=self.device)

    def _segment_after_oom(self, image: np.ndarray, options: PipelineOptions) -> np.ndarray:
        from cutout.workers.segment import get_segmenter

        spec_size = options.seg_size or 1024
        smaller = options.model_copy(update={"seg_size": max(256, spec_size // 2)})
        try:
            return get_segmenter(smaller, device=self.device).predict([image])[0]
        except OutOfMemoryError:
            return get_segmenter(smaller, device="cpu").predict([image])[0]

    def _background_array(self) -> np.ndarray | None:
        if self.background.kind != "image":
            return None
        if self._background_image is None:
            from cutout.workers.decode import decode_image

            read = self._read_uri or _default_reader()
            data = read(self.background.image_uri or "")
            self._background_image = decode_image(data, name="background image").rgb
        return self._background_image

    def finish(
        self, rgb: np.ndarray, mask: np.ndarray, input_alpha: np.ndarray | None = None,
        trimap: np.ndarray | None = None, disagreement: float | None = None,
    ) -> CutoutResult:
        """Refine → trimap → matte → foreground → composite for one image whose mask is known.
        ``disagreement``: a fused model's (``FusedMask.disagreement``), for the cascade."""
        from cutout.workers.foreground import estimate_foreground
        from cutout.workers.quality import measure
        from cutout.workers.trimap import make_trimap

        opts = self.options
        notes: list[str] = []
        timings: dict[str, float] = {}
        unrefined = mask
        if self.refine_method == "grabcut" and trimap is None:
            from cutout.workers.refine import refine_with_grabcut

            mask, skipped = run_stage(timings, "refine", refine_with_grabcut, rgb, mask)
            if skipped:
                notes.append(skipped)
        alpha = mask
        user_trimap = trimap is not None
        if opts.matting != "none" or user_trimap:
            if trimap is None:
                trimap = run_stage(
                    timings, "trimap", make_trimap, mask, fg_threshold=opts.trimap_fg,
                    bg_threshold=opts.trimap_bg, band=opts.trimap_band,
                )
            alpha = run_stage(timings, "matte", self._matte, rgb, trimap, mask, notes,
                              user_trimap=user_trimap)
        if opts.objects == "main" and not user_trimap and not opts.select_by:
            alpha = run_stage(timings, "objects", self._keep_main_object, alpha, notes)
        foreground = None
        if self.background.kind != "mask":
            foreground = run_stage(timings, "foreground", estimate_foreground, rgb, alpha)
        if input_alpha is not None:
            alpha = alpha * (input_alpha.astype(np.float32) / 255.0)
            notes.append("input-alpha-applied")
        image = run_stage(timings, "composite", self._composite, rgb, alpha, foreground)
        quality, flags = measure(alpha, mask, trimap, notes, fg_threshold=opts.trimap_fg,
                                 bg_threshold=opts.trimap_bg, rgb=rgb, unrefined=unrefined,
                                 ramp=self.mask_ramp)
        result = CutoutResult(image, alpha, mask, trimap, notes, timings, quality, flags)
        apart = disagreement is not None and disagreement > opts.escalate_apart
        if opts.escalate and not user_trimap and (quality["score"] < opts.escalate_below or apart):
            why = f"models disagree {disagreement:.2f}" if apart else f"score {quality['score']:.2f}"
            result = self._escalate(rgb, input_alpha, result, why, prefer_second=apart)
        return result

    def _escalate(self, rgb: np.ndarray, input_alpha, first: CutoutResult, why: str = "",
                  prefer_second: bool = False) -> CutoutResult:
        """The cascade: rerun a doubtful output with the costlier preset (once: that preset's own
        escalation is off), keep the higher score; ``why`` (the trigger) goes into the note.
        ``prefer_second`` (the networks disagreed): the rerun's output is kept unless the first
        scores more than ``APART_KEEP_MARGIN`` higher, because the score, a model of one output,
        reads a cheap network's clean cutout of the wrong object as right."""
        if self._escalation is None:
            opts = self.options
            keep = {"background": opts.background, "format": opts.format, "quality": opts.quality,
                    "max_pixels": opts.max_pixels, "objects": opts.objects}
            if opts.select_by:  # the second run cuts out the same classes
                keep.update(select_by=opts.select_by, classes=opts.classes,
                            score_threshold=opts.score_threshold)
            self._escalation = Pipeline(PipelineOptions(preset=opts.escalate, escalate=None, **keep),
                                        device=self.device, read_uri=self._read_uri, nested=True)
        timings = dict(first.timings)  # both runs' seconds, stage by stage
        mask = run_stage(timings, "segment", self._escalation.segment, [rgb])[0]
        selection: list[str] = []
        if self.options.select_by:
            mask = run_stage(timings, "select", self._escalation.select, rgb, mask, selection)
        second = self._escalation.finish(rgb, mask, input_alpha=input_alpha)
        second.notes[:0] = selection
        for stage, seconds in second.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        if prefer_second:
            kept = first if first.quality["score"] > second.quality["score"] + APART_KEEP_MARGIN else second
        else:
            kept = second if second.quality["score"] > first.quality["score"] else first
        kept.notes.append(f"escalated to {self.options.escalate}{f' ({why})' if why else ''}: score "
                          f"{first.quality['score']:.2f} -> {second.quality['score']:.2f}, kept the "
                          f"{'second' if kept is second else 'first'}")
        kept.timings = timings
        return kept

    def _composite(self, rgb: np.ndarray, alpha: np.ndarray, foreground) -> np.ndarray:
        from cutout.workers.composite import composite

        return composite(rgb, alpha, self.background, foreground=foreground,
                         background_image=self._background_array())

    def _matte(self, rgb, trimap, mask, notes: list[str], *, user_trimap: bool = False) -> np.ndarray:
        from cutout.jobs.errors import CutoutError as _Err
        from cutout.workers.matte import estimate_alpha

        method = self.options.matting if self.options.matting != "none" else "closed-form"
        unknown_share = float((trimap == 128).mean())
        if unknown_share > self.options.matting_max_unknown and not user_trimap:
            notes.append(f"matting-skipped: unknown band covers {unknown_share:.0%} of the image "
                         f"(limit {self.options.matting_max_unknown:.0%})")
            return mask
        try:
            bounds = {"max_side": None, "budget": None, "precise": True} if user_trimap else {
                "max_side": self.options.matting_max_side}
            result = estimate_alpha(rgb, trimap, method=method, mask=mask, **bounds)
        except _Err as exc:  # a matting failure degrades to the mask, loudly
            notes.append(f"matting-fallback: {exc}")
            return mask
        if result.method == "none":
            notes.append("matting-skipped: no confident foreground or background to solve from")
        return result.alpha

    # --- the batch driver ----------------------------------------------------------------------
    def run(self, inputs: Sequence[PipelineInput], *, encode: bool = True,
            keep_result: bool = False) -> list[ItemOutcome]:
        """The one driver of the stages: decode → segment → calibrate → finish → encode.

        Every input gets an outcome in its slot, good or bad: a failure is the item's typed
        error (labelled with its stage), never its neighbours'. The decoded inputs go through
        the model as one batch; if the batch fails, one at a time, so only the culprit fails.
        An input with a hand trimap is not segmented (its record notes ``hand-trimap``).
        ``encode`` makes the output bytes (the item loop); ``keep_result`` keeps the arrays on
        the outcome (the Python API, eval).
        """
        outcomes = [ItemOutcome(ok=False) for _ in inputs]
        images = self._decode(inputs, outcomes)
        boxed = {i: images.pop(i) for i in list(images) if inputs[i].box is not None}
        for index, image in boxed.items():
            self._finish_box(outcomes[index], image, inputs[index].box, encode=encode,
                             keep_result=keep_result)
        trimaps = self._hand_trimaps(inputs, images, outcomes)
        raw = self._segment_indexed({i: image for i, image in images.items() if i not in trimaps},
                                    outcomes)
        for index in sorted(set(raw) | set(trimaps)):
            try:
                self._finish_item(outcomes[index], images[index], raw.get(index),
                                  trimaps.get(index), encode=encode, keep_result=keep_result)
            except Exception as exc:  # noqa: BLE001 - every failure becomes this item's outcome
                outcomes[index].error = _as_error(exc, "pipeline")
        return outcomes

    def _decode(self, inputs: Sequence[PipelineInput], outcomes: list[ItemOutcome]) -> dict[int, _Image]:
        """Bytes → RGB (+ alpha) per input; an undecodable input gets its error and stops here."""
        from cutout.workers.decode import decode_image

        images: dict[int, _Image] = {}
        seen: dict[int, tuple] = {}  # id(data) → (image, notes) or (None, error): one decode per image
        for index, (item, outcome) in enumerate(zip(inputs, outcomes)):
            if item.data is None:
                image = _Image(item.rgb, item.alpha)
            elif id(item.data) in seen:  # another box of an image decoded for this batch
                image, notes = seen[id(item.data)]
                if image is None:
                    outcome.error = notes
                    continue
                outcome.notes = list(notes)
            else:
                try:
                    decoded = run_stage(outcome.timings, "decode", decode_image, item.data,
                                        max_pixels=self.options.max_pixels, name=item.name)
                except Exception as exc:  # noqa: BLE001 - every failure becomes a record
                    outcome.error = _as_error(exc, "decode")
                    seen[id(item.data)] = (None, outcome.error)
                    continue
                image = _Image(decoded.rgb, decoded.alpha)
                outcome.notes = list(decoded.notes)
                seen[id(item.data)] = (image, tuple(decoded.notes))
            images[index] = image
            outcome.width, outcome.height = image.rgb.shape[1], image.rgb.shape[0]
        return images

    def _hand_trimaps(self, inputs: Sequence[PipelineInput], images: dict[int, _Image],
                      outcomes: list[ItemOutcome]) -> dict[int, np.ndarray]:
        """The hand trimaps of the decoded inputs that have one (checked against the image);
        one that cannot be used fails its input."""
        trimaps: dict[int, np.ndarray] = {}
        for index in list(images):
            given = inputs[index].trimap
            if given is None:
                continue
            try:
                trimaps[index] = run_stage(outcomes[index].timings, "trimap", _load_trimap, given,
                                           images[index].rgb.shape[:2])
            except Exception as exc:  # noqa: BLE001
                outcomes[index].error = _as_error(exc, "trimap")
                del images[index]
        return trimaps

    def _finish_item(self, outcome: ItemOutcome, image: _Image, raw: np.ndarray | None,
                     trimap: np.ndarray | None, *, encode: bool, keep_result: bool) -> None:
        """One decoded item with its raw mask (or hand trimap) to its result, every stage timed
        into its outcome."""
        if trimap is None:
            mask = run_stage(outcome.timings, "calibrate", self.calibrate, raw)
            if self.options.select_by:
                mask = run_stage(outcome.timings, "select", self.select, image.rgb, mask, outcome.notes)
        else:  # no model ran: the trimap is the mask (unknown = 0.5) for matting and quality
            mask = trimap.astype(np.float32) / 255.0
            outcome.notes.append(HAND_TRIMAP_NOTE)
        result = self.finish(image.rgb, mask, input_alpha=image.alpha, trimap=trimap,
                             disagreement=getattr(raw, "disagreement", None))
        result.raw_mask = raw
        self._complete(outcome, result, encode=encode, keep_result=keep_result)

    def _finish_box(self, outcome: ItemOutcome, image: _Image, box, *, encode: bool,
                    keep_result: bool) -> None:
        """One boxed object of a decoded image (``cutout.workers.boxes``); a box that names no
        pixels, or any other failure, is this object's error alone."""
        from cutout.workers.boxes import box_region, cut_out_box

        try:
            height, width = image.rgb.shape[:2]
            region = run_stage(outcome.timings, "box", box_region, box, width, height)
            result = cut_out_box(self, image.rgb, region, input_alpha=image.alpha,
                                 crop_output=self.options.crop)
            self._complete(outcome, result, encode=encode, keep_result=keep_result)
            outcome.height, outcome.width = result.alpha.shape
        except Exception as exc:  # noqa: BLE001 - one object's failure never fails its neighbours
            outcome.error = _as_error(exc, "box")

    def _complete(self, outcome: ItemOutcome, result: CutoutResult, *, encode: bool,
                  keep_result: bool) -> None:
        """A finished result into its outcome: timings, notes, quality, encoded bytes."""
        for stage, seconds in result.timings.items():
            outcome.timings[stage] = outcome.timings.get(stage, 0.0) + seconds
        result.timings = outcome.timings
        result.notes = outcome.notes = outcome.notes + result.notes
        if encode:
            from cutout.workers.encode import encode_image

            outcome.data = run_stage(outcome.timings, "encode", encode_image, result.image,
                                     self.options.format, quality=self.options.quality)
            outcome.extension = self.options.extension
        outcome.quality, outcome.flags = result.quality, result.flags
        outcome.result = result if keep_result else None
        outcome.ok = True

    def _segment_indexed(self, images: dict[int, _Image], outcomes: list[ItemOutcome]) -> dict:
        """Raw masks of all ``images`` as one batch; if the batch fails, retry one by one."""
        if not images:
            return {}
        indices = list(images)
        try:
            masks = self._segment_timed([images[i].rgb for i in indices],
                                        [outcomes[i].timings for i in indices])
            return dict(zip(indices, masks))
        except Exception:  # noqa: BLE001 - isolate the culprit below
            pass
        result = {}
        for i in indices:
            try:
                result[i] = self._segment_timed([images[i].rgb], [outcomes[i].timings])[0]
            except Exception as exc:  # noqa: BLE001
                outcomes[i].error = _as_error(exc, "segment")
        return result

    def _segment_timed(self, images: list[np.ndarray], timings: list[dict[str, float]]) -> list[np.ndarray]:
        """Segment a batch as one stage, its seconds shared evenly among the items."""
        batch: dict[str, float] = {}
        raw = run_stage(batch, "segment", self.segment_raw, images)
        for item_timings in timings:
            item_timings["segment"] = item_timings.get("segment", 0.0) + batch["segment"] / len(images)
        return raw


HAND_TRIMAP_NOTE = "hand-trimap: segmentation skipped"
NO_HAND_TRIMAP_NOTE = "no-hand-trimap: segmented by the model"


def _load_trimap(trimap: bytes | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A hand trimap, encoded or an array, as uint8 0 / 128 / 255 of the image's size."""
    from cutout.workers.trimap import load_trimap, normalise_trimap

    if isinstance(trimap, (bytes, bytearray)):
        return load_trimap(bytes(trimap), shape=shape)
    return normalise_trimap(trimap, shape)


def _default_reader() -> Callable[[str], bytes]:
    from cutout.jobs import storage

    return storage.read_bytes
