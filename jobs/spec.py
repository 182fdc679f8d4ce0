"""The job contract: pipeline options and job spec, validated once into typed objects.

Both halves import this module: the submitter to build and hash a job, the workers to run it.
A spec's canonical JSON hash names the job, so submitting the same spec twice resumes it.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from cutout.jobs.errors import ConfigError
from cutout.jobs.presets import PresetName, apply_preset

MattingMethod = Literal["none", "closed-form", "knn"]
OutputFormat = Literal["png", "webp", "webp-lossy", "jpeg"]
FusionRule = Literal["max", "mean"]
FORMAT_EXTENSIONS = {"png": ".png", "webp": ".webp", "webp-lossy": ".webp", "jpeg": ".jpg"}

_HEX_COLOR = re.compile(r"^#?([0-9a-fA-F]{6})$")
# Who sets a PipelineOptions field (its ``json_schema_extra``); see user_option_fields().
USER = {"user": True}
INTERNAL = {"user": False}


def _split_classes(value):
    """"person,dog" (command-line text) or a list → lower-case names."""
    if isinstance(value, str):
        value = [c for c in value.split(",") if c.strip()]
    return tuple(c.strip().lower() for c in value)


def _parse_model_sizes(value):
    """"NAME=SIZE,NAME=SIZE" (command-line text), a dict or pairs → sorted pairs (stable hash)."""
    original = value
    if isinstance(value, str):
        value = [item.split("=", 1) for item in value.split(",") if item.strip()]
    pairs = value.items() if isinstance(value, dict) else value
    try:
        sizes = {str(name).strip(): int(size) for name, size in pairs}
    except (TypeError, ValueError):
        raise ConfigError(f"model_sizes {original!r}: expected NAME=SIZE[,NAME=SIZE...]") from None
    for name, size in sizes.items():
        if not 64 <= size <= 4096:
            raise ConfigError(f"model_sizes: {name}={size} is outside 64..4096")
    return tuple(sorted(sizes.items()))


# Field types that also take their command-line text, so a flag, a job-file string and a Python
# value all go through one parser.
ClassNames = Annotated[tuple[str, ...], BeforeValidator(_split_classes)]
ModelSizes = Annotated[tuple[tuple[str, int], ...], BeforeValidator(_parse_model_sizes)]


class Background(BaseModel):
    """What the subject is composited onto; parsed from strings like ``color:#ff0000``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["transparent", "mask", "color", "blur", "image"]
    color: tuple[int, int, int] | None = None
    blur_radius: int | None = None
    image_uri: str | None = None

    @property
    def opaque(self) -> bool:
        """True when the result has no alpha channel (JPEG is allowed)."""
        return self.kind in ("color", "blur", "image")

    @classmethod
    def parse(cls, text: str) -> "Background":
        kind, _, arg = text.strip().partition(":")
        kind = kind.lower()
        if kind in ("transparent", "rgba") and not arg:
            return cls(kind="transparent")
        if kind in ("mask", "alpha") and not arg:
            return cls(kind="mask")
        if kind == "color":
            match = _HEX_COLOR.match(arg)
            if not match:
                raise ConfigError(f"background {text!r}: expected color:#RRGGBB")
            value = match.group(1)
            rgb = tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))
            return cls(kind="color", color=rgb)  # type: ignore[arg-type]
        if kind == "blur":
            radius = 25
            if arg:
                if not arg.isdigit() or not 1 <= int(arg) <= 500:
                    raise ConfigError(f"background {text!r}: blur radius must be 1..500 px")
                radius = int(arg)
            return cls(kind="blur", blur_radius=radius)
        if kind == "image" and arg:
            return cls(kind="image", image_uri=arg)
        raise ConfigError(
            f"unknown background {text!r}: use transparent, mask, color:#RRGGBB, "
            "blur[:radius] or image:URI"
        )

    def __str__(self) -> str:
        if self.kind == "color" and self.color:
            return "color:#%02x%02x%02x" % self.color
        if self.kind == "blur":
            return f"blur:{self.blur_radius}"
        if self.kind == "image":
            return f"image:{self.image_uri}"
        return self.kind


class PipelineOptions(BaseModel):
    """Everything that decides the pixels of an output. Hashable, JSON-stable, frozen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Each field says what it does (its ``description`` is the flag's help and the API's docs)
    # and who sets it: USER fields are flags of run/submit/redo/eval, keywords of the Python API
    # and redo overrides; INTERNAL ones are tuning knobs the presets set (job-file keys only).
    preset: PresetName = Field(
        "balanced", json_schema_extra=USER,
        description="quality/CPU trade-off (docs/results.md); fills every option not set explicitly")
    model: str = Field(
        "isnet-general", json_schema_extra=USER,
        description="segmentation model (cutout models list), or A+B to fuse two")
    classes: ClassNames = Field(
        (), json_schema_extra=USER,
        description="comma-separated class names for semantic/instance models (PASCAL VOC / COCO)")
    select_by: str | None = Field(
        None, json_schema_extra=USER,
        description="a class model (deeplabv3-mobilenet-v3, deeplabv3-resnet101, "
                    "lraspp-mobilenet-v3, maskrcnn) whose mask of the classes (default: all of "
                    "its classes) picks which of the salient model's objects are kept")
    weights: str | None = Field(
        None, json_schema_extra=USER, description="weights file: local path, file:// or s3:// URI")
    score_threshold: float = Field(
        0.5, ge=0.0, le=1.0, json_schema_extra=USER,
        description="minimum detection score kept by instance models (maskrcnn)")
    seg_size: int | None = Field(
        None, ge=64, le=4096, json_schema_extra=USER,
        description="one model pass at this input side; in a fusion, every model without a "
                    "model_sizes entry")
    fusion: FusionRule | None = Field(
        None, json_schema_extra=USER,
        description="how a fused model (A+B) combines its models' soft masks: max keeps a pixel "
                    "any model is sure of, mean averages")
    model_sizes: ModelSizes = Field(
        (), json_schema_extra=USER,
        description="input size per model of a fused model, e.g. isnet-general=1024,modnet=512; "
                    "beats seg_size for that model")
    seg_sizes: tuple[int, ...] | None = Field(
        None, json_schema_extra=INTERNAL,
        description="input sides of the passes (unset: the model's own); seg_size, when set, wins")
    size_rule: Literal["mean", "max"] = Field(
        "mean", json_schema_extra=INTERNAL,
        description="how several passes combine: mean averages, max keeps a pixel any pass is "
                    "sure of (IS-Net leaves parts grey at different sizes on different photos)")
    mask_ramp: tuple[float, float] | None = Field(
        None, json_schema_extra=INTERNAL,
        description="soft-mask values mapped to 0 and 1, linear between (unset: the model's calibration)")
    refine: Literal["auto", "none", "grabcut"] = Field(
        "auto", json_schema_extra=USER,
        description="GrabCut refinement of the mask (auto: the model's measured default)")
    objects: Literal["main", "all"] = Field(
        "main", json_schema_extra=USER,
        description="when the kept area falls apart into parts of similar size: main keeps the "
                    "one nearest the centre (weighted by size), all keeps every part (a pair of "
                    "shoes, a shelf)")
    escalate: PresetName | None = Field(
        None, json_schema_extra=USER,
        description="rerun outputs whose quality score is below escalate_below with this preset, "
                    "keeping the output with the higher score (the cascade)")
    escalate_below: float = Field(
        0.5, ge=0.0, le=1.0, json_schema_extra=USER,
        description="quality score below which an output is rerun with the escalate preset")
    escalate_apart: float = Field(
        1.0, ge=0.0, le=1.0, json_schema_extra=USER,
        description="with a fused model (A+B), also rerun outputs whose models disagree by more "
                    "than this (1 - IoU of their masks; 1: never)")
    trimap_fg: float = Field(0.95, gt=0.0, lt=1.0, json_schema_extra=INTERNAL,
                             description="mask value above which a pixel is sure foreground")
    trimap_bg: float = Field(0.05, gt=0.0, lt=1.0, json_schema_extra=INTERNAL,
                             description="mask value below which a pixel is sure background")
    trimap_band: float = Field(
        0.01, ge=0.0, le=0.2, json_schema_extra=USER,
        description="unknown band half-width as a fraction of the long side")
    matting: MattingMethod = Field(
        "closed-form", json_schema_extra=USER, description="alpha matting in the unknown band")
    matting_max_side: int = Field(
        640, ge=64, le=8192, json_schema_extra=INTERNAL,
        description="matting solves on a downscaled band above this side")
    matting_max_unknown: float = Field(
        0.3, gt=0.0, le=1.0, json_schema_extra=INTERNAL,
        description="above this share of unknown pixels the mask is too unsure for matting to "
                    "help (measured); matting is skipped")
    background: str = Field(
        "transparent", json_schema_extra=USER,
        description="transparent | mask | color:#RRGGBB | blur[:radius] | image:URI")
    format: OutputFormat = Field(
        "png", json_schema_extra=USER,
        description="output format (jpeg needs an opaque background)")
    quality: int = Field(90, ge=1, le=100, json_schema_extra=USER,
                         description="lossy WebP / JPEG quality")
    max_pixels: int = Field(64_000_000, ge=1, json_schema_extra=USER,
                            description="inputs over this many pixels are refused from the header")
    crop: bool = Field(
        False, json_schema_extra=USER,
        description="with box hints: write just the box and its margin (object banks), not the "
                    "whole frame")

    @property
    def component_models(self) -> tuple[str, ...]:
        """The models a fused ``model`` ("a+b") combines; a plain model is its own component."""
        return tuple(name.strip() for name in self.model.split("+"))

    def model_size(self, name: str) -> int | None:
        """Input size for component ``name``: ``model_sizes`` first, then ``seg_size``."""
        return dict(self.model_sizes).get(name, self.seg_size)
    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data):
        return apply_preset(dict(data)) if isinstance(data, dict) else data

    @field_validator("seg_sizes")
    @classmethod
    def _check_sizes(cls, value):
        if value is not None and (not value or not all(64 <= size <= 4096 for size in value)):
            raise ConfigError(f"seg_sizes {value}: need one or more sides in 64..4096")
        return value

    @model_validator(mode="after")
    def _check_consistent(self) -> "PipelineOptions":
        background = self.parsed_background()
        components = self.component_models
        if self.fusion is not None and len(components) < 2:
            raise ConfigError(f"fusion {self.fusion!r} needs a fused model such as isnet-general+modnet (got {self.model!r})")
        if self.model_sizes and len(components) < 2:
            raise ConfigError(f"model_sizes is for a fused model (A+B); for {self.model!r} use seg_size")
        unknown = [name for name, _ in self.model_sizes if name not in components]
        if unknown:
            raise ConfigError(f"model_sizes names {', '.join(unknown)}, not part of model {self.model!r}")
        if len(components) > 1 and self.weights:
            raise ConfigError("weights overrides one model's file; a fused model has several (use CUTOUT_MODELS_DIR)")
        if self.select_by is not None:
            _check_select_by(self.select_by, self.model, self.classes)
        if self.mask_ramp is not None and not 0.0 <= self.mask_ramp[0] < self.mask_ramp[1] <= 1.0:
            raise ConfigError(f"mask_ramp {self.mask_ramp}: need 0 <= low < high <= 1")
        if self.trimap_bg >= self.trimap_fg:
            raise ConfigError("trimap_bg must be below trimap_fg")
        if self.format == "jpeg" and not background.opaque:
            raise ConfigError(
                f"format jpeg cannot carry transparency (background {self.background!r}); "
                "use png/webp or an opaque background (color:, blur, image:)"
            )
        return self

    def with_overrides(self, overrides: dict) -> "PipelineOptions":
        """These options changed as if ``overrides`` had been given with the original settings:
        what the old preset filled in is filled again by the (new) preset and model, what
        the caller chose stays, ``overrides`` win. Why: ``redo --preset best`` must get best's
        sizes, not keep balanced's, which a plain merge of stored values would."""
        return PipelineOptions(**{**self.explicit_fields(), **overrides})

    def explicit_fields(self) -> dict:
        """The fields that differ from what the preset alone fills in (with the same model when
        the model is not the preset's own): the ones a caller chose, plus the preset."""
        from cutout.jobs.presets import PRESETS

        own_model = self.model == PRESETS[self.preset]["model"]
        filled = PipelineOptions(preset=self.preset, **({} if own_model else {"model": self.model}))
        chosen = {name: value for name, value in self.model_dump().items() if value != getattr(filled, name)}
        return {"preset": self.preset, **chosen}

    def parsed_background(self) -> Background:
        return Background.parse(self.background)

    @property
    def extension(self) -> str:
        return FORMAT_EXTENSIONS[self.format]

    def config_hash(self) -> str:
        """The options and the quality score's model version: both decide what a record holds."""
        from cutout.jobs.records import QUALITY_MODEL

        return stable_hash({**self.model_dump(mode="json"), "quality_model": QUALITY_MODEL})


def _check_select_by(class_model: str, model: str, classes: tuple[str, ...]) -> None:
    """``select_by`` names a class model, the classes are its own, and ``model`` is a salient
    one (a model that takes classes already picks them)."""
    from cutout.workers.models.registry import get_model_spec, list_models, resolve_classes

    class_models = [name for name in list_models()
                    if get_model_spec(name).takes_classes and not get_model_spec(name).components]
    if class_model not in class_models:
        raise ConfigError(f"select_by {class_model!r} is not a class model; use one of: "
                          f"{', '.join(class_models)}")
    if get_model_spec(model).takes_classes:
        raise ConfigError(f"select_by picks among a salient model's objects; model {model!r} "
                          "takes classes itself (use --classes with it alone)")
    resolve_classes(get_model_spec(class_model), classes)


def user_option_fields() -> dict[str, FieldInfo]:
    """The user-facing pipeline options, in declaration order: the one list every surface (CLI
    flags, redo overrides, the Python API's keywords) is made from, so none can miss one."""
    return {name: info for name, info in PipelineOptions.model_fields.items()
            if (info.json_schema_extra or {}).get("user")}


class JobSpec(BaseModel):
    """A whole job: inputs, destination, pipeline. Stored at DEST/_cutout/jobs/<job_id>/spec.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: tuple[str, ...]
    destination: str
    pipeline: PipelineOptions = PipelineOptions()
    weights_sha256: str | None = None  # resolved at submit time when known
    # None: the size follows the job's size (cutout.jobs.sharding.AUTO_SHARD_SIZES)
    shard_size: int | None = Field(None, ge=1, le=10_000)
    queue: str = "cutout"
    suffix: str = ""  # appended to each output stem, e.g. "_cutout"
    # Box hints in list files (cutout.jobs.boxes): the column holding them and their format.
    box_column: str = "bbox"
    box_format: Literal["xywh", "xyxy", "xywhn", "xyxyn"] = "xywh"
    # COCO annotation sources (cutout.jobs.coco): where their images live (file names join it).
    images: str | None = None
    annotation_classes: tuple[str, ...] = ()  # COCO sources: the categories kept (all when empty)

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, value):
        if not value:
            raise ConfigError("a job needs at least one source")
        return value

    @property
    def job_id(self) -> str:
        return stable_hash(self.model_dump(mode="json"))[:16]


def stable_hash(data) -> str:
    """sha256 of canonical JSON: the same settings always give the same name."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
