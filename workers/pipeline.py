"""The whole image pipeline as plain code: decode → segment → calibrate → refine → trimap →
matte → foreground → composite → encode. Workers, ``cutout run`` and the Python API all call
this module.

``Pipeline`` holds the options and the (lazily loaded) segmenter; ``process_batch`` turns raw
bytes into encoded outputs and never lets one bad image fail its neighbours. Every stage runs
through ``cutout.workers.stages.run_stage``, which times it and names it in a failure.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cutout.jobs.errors import CutoutError, OutOfMemoryError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.stages import run_stage


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


@dataclass
class ItemOutcome:
    """One input's fate in ``process_batch``: encoded bytes or a typed error."""

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
    ):
        self.options = options or PipelineOptions()
        self.device = device
        self.background = self.options.parsed_background()
        self._read_uri = read_uri
        self._background_image: np.ndarray | None = None

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
        return time.perf_counter() - start

    def segment_raw(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The model's soft masks over ``seg_sizes``, combined by ``options.size_rule``."""
        per_size = [self.segment_at(images, size) for size in self.seg_sizes]
        if len(per_size) == 1:
            return per_size[0]
        combine = np.max if self.options.size_rule == "max" else np.mean
        return [combine(masks, axis=0).astype(np.float32) for masks in zip(*per_size)]

    def segment_at(self, images: list[np.ndarray], size: int | None) -> list[np.ndarray]:
        """One size; on device OOM retry one by one, then at half the size, then on CPU."""
        from cutout.workers.segment import get_segmenter

        options = self.options.model_copy(update={"seg_size": size})
        try:
            return get_segmenter(options, device=self.device).predict(images)
        except OutOfMemoryError:
            if len(images) > 1:
                return [self.segment_at([image], size)[0] for image in images]
            return [self._segment_after_oom(images[0], options)]

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
        trimap: np.ndarray | None = None,
    ) -> CutoutResult:
        """Refine → trimap → matte → foreground → composite for one image whose mask is known."""
        from cutout.workers.foreground import estimate_foreground
        from cutout.workers.quality import measure
        from cutout.workers.trimap import make_trimap

        opts = self.options
        notes: list[str] = []
        timings: dict[str, float] = {}
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
        foreground = None
        if self.background.kind != "mask":
            foreground = run_stage(timings, "foreground", estimate_foreground, rgb, alpha)
        if input_alpha is not None:
            alpha = alpha * (input_alpha.astype(np.float32) / 255.0)
            notes.append("input-alpha-applied")
        image = run_stage(timings, "composite", self._composite, rgb, alpha, foreground)
        quality, flags = measure(alpha, mask, trimap, notes, fg_threshold=opts.trimap_fg,
                                 bg_threshold=opts.trimap_bg)
        return CutoutResult(image, alpha, mask, trimap, notes, timings, quality, flags)

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

    # --- batch entry points ------------------------------------------------------------------
    def masks(self, images: list[np.ndarray], timings: list[dict[str, float]]) -> list[np.ndarray]:
        """Segment a batch as one stage (its seconds shared evenly), then calibrate each mask."""
        batch: dict[str, float] = {}
        raw = run_stage(batch, "segment", self.segment_raw, images)
        for item_timings in timings:
            item_timings["segment"] = item_timings.get("segment", 0.0) + batch["segment"] / len(images)
        return [run_stage(item_timings, "calibrate", self.calibrate, mask)
                for item_timings, mask in zip(timings, raw)]

    def run_images(self, images: list[np.ndarray]) -> list[CutoutResult]:
        """Arrays in, results out (uint8 RGB images). Errors propagate, labelled with their
        stage (``CutoutError.stage``): for library callers."""
        timings: list[dict[str, float]] = [{} for _ in images]
        results = []
        for rgb, mask, item_timings in zip(images, self.masks(images, timings), timings):
            result = self.finish(rgb, mask)
            result.timings = {**item_timings, **result.timings}
            results.append(result)
        return results

    def process_batch(
        self, items: list[tuple[str, bytes]], trimaps: list[bytes | None] | None = None,
        boxes: list | None = None,
    ) -> list[ItemOutcome]:
        """Bytes in, encoded outputs out; every item gets an outcome, good or bad.

        ``trimaps`` (encoded gray images, or None per item) replace the automatic trimap;
        ``boxes`` (``cutout.jobs.boxes.BoxHint`` or None per item) cut out the boxed object.
        """
        from cutout.workers.decode import decode_image

        if boxes is not None and any(box is not None for box in boxes):
            from cutout.workers.boxes import process_box_batch

            return process_box_batch(self, items, trimaps, boxes)

        outcomes: list[ItemOutcome] = [ItemOutcome(ok=False) for _ in items]
        decoded = {}
        for index, (name, data) in enumerate(items):
            outcome = outcomes[index]
            try:
                image = run_stage(outcome.timings, "decode", decode_image, data,
                                  max_pixels=self.options.max_pixels, name=name)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a record
                outcome.error = _as_error(exc, "decode")
                continue
            decoded[index] = image
            outcome.width, outcome.height = image.rgb.shape[1], image.rgb.shape[0]
            outcome.notes = list(image.notes)
        masks = self._segment_indexed(decoded, outcomes)
        for index, mask in masks.items():
            trimap = trimaps[index] if trimaps else None
            try:
                self._finish_item(outcomes[index], decoded[index], mask, trimap)
            except Exception as exc:  # noqa: BLE001
                outcomes[index].error = _as_error(exc, "pipeline")
        return outcomes

    def _finish_item(self, outcome: ItemOutcome, image, mask: np.ndarray,
                     trimap_data: bytes | None) -> None:
        """One decoded, segmented item to encoded bytes, every stage timed into its outcome."""
        from cutout.workers.encode import encode_image
        from cutout.workers.trimap import load_trimap

        trimap = None
        if trimap_data is not None:
            trimap = run_stage(outcome.timings, "trimap", load_trimap, trimap_data,
                               shape=image.rgb.shape[:2])
        result = self.finish(image.rgb, mask, input_alpha=image.alpha, trimap=trimap)
        for stage, seconds in result.timings.items():
            outcome.timings[stage] = outcome.timings.get(stage, 0.0) + seconds
        outcome.data = run_stage(outcome.timings, "encode", encode_image, result.image,
                                 self.options.format, quality=self.options.quality)
        outcome.extension = self.options.extension
        outcome.notes = outcome.notes + result.notes
        outcome.quality, outcome.flags = result.quality, result.flags
        outcome.ok = True

    def _segment_indexed(self, decoded: dict, outcomes: list[ItemOutcome]) -> dict:
        """Segment all decoded images as one batch; if the batch fails, retry one by one."""
        if not decoded:
            return {}
        indices = list(decoded)
        try:
            masks = self.masks([decoded[i].rgb for i in indices],
                               [outcomes[i].timings for i in indices])
            return dict(zip(indices, masks))
        except Exception:  # noqa: BLE001 - isolate the culprit below
            pass
        result = {}
        for i in indices:
            try:
                result[i] = self.masks([decoded[i].rgb], [outcomes[i].timings])[0]
            except Exception as exc:  # noqa: BLE001
                outcomes[i].error = _as_error(exc, "segment")
        return result


def _default_reader() -> Callable[[str], bytes]:
    from cutout.jobs import storage

    return storage.read_bytes


_PIPELINES: dict[tuple, object] = {}  # one cutout.workers.api.Session per (options, device)


def remove_background(
    image,
    *,
    options: PipelineOptions | None = None,
    device: str | None = None,
    trimap: np.ndarray | None = None,
    **overrides,
) -> CutoutResult:
    """``cutout.remove_background`` for callers holding ``PipelineOptions`` (benchmarks, eval):
    ``options`` and/or field overrides; the work is ``cutout.workers.api.Session.remove``, and
    the session (its model) is reused across calls with the same options.
    """
    from cutout.workers.api import Session

    if options is None:  # the preset resolves around the overrides (its model's values stay its own)
        opts = PipelineOptions(**overrides)
    else:
        opts = PipelineOptions(**{**options.model_dump(), **overrides}) if overrides else options
    key = (opts.config_hash(), device)
    session = _PIPELINES.get(key)
    if session is None:
        session = _PIPELINES[key] = Session(options=opts, device=device)
    return session.remove(image, trimap=trimap)
