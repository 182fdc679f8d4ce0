"""Pipeline options on the command line, shared by ``run``, ``eval`` and ``submit``.

Flag names match ``cutout.jobs.spec.PipelineOptions`` fields; validation errors become ConfigError.
"""
from __future__ import annotations

import argparse

from pydantic import ValidationError

from cutout.jobs.errors import ConfigError


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``run``, ``eval`` and ``submit``; names match PipelineOptions."""
    group = parser.add_argument_group("pipeline")
    group.add_argument("--preset", choices=["fast", "balanced", "best"],
                       help="quality/CPU trade-off (default balanced; docs/results.md); "
                            "explicit flags override it")
    group.add_argument("--model", help="segmentation model (cutout models list), or A+B to fuse two; default: the preset's")
    group.add_argument("--classes", default="", help="comma-separated class names (PASCAL VOC / COCO)")
    group.add_argument("--weights", help="weights file: local path, file:// or s3:// URI")
    group.add_argument("--score-threshold", type=float, default=0.5)
    group.add_argument("--seg-size", type=int, help="model input side (default: the model's)")
    group.add_argument("--fusion", choices=["max", "mean"],
                       help="how a fused model (--model A+B) combines masks (default: max)")
    group.add_argument("--model-sizes", help="input size per model, e.g. isnet-general=1024,modnet=512")
    group.add_argument("--refine", choices=["auto", "none", "grabcut"],
                       help="GrabCut refinement of the mask (default: the preset's; auto: the model's)")
    group.add_argument("--matting", choices=["none", "closed-form", "knn"], help="default: the preset's")
    group.add_argument("--trimap-band", type=float,
                       help="unknown band half-width as a fraction of the long side (default: the preset's)")
    group.add_argument("--background", default="transparent",
                       help="transparent | mask | color:#RRGGBB | blur[:radius] | image:URI")
    group.add_argument("--format", default="png", choices=["png", "webp", "webp-lossy", "jpeg"])
    group.add_argument("--quality", type=int, default=90)
    group.add_argument("--max-pixels", type=int, default=64_000_000)


def options_from_args(args: argparse.Namespace):
    from cutout.jobs.spec import PipelineOptions

    fields = {
        "preset": args.preset, "model": args.model, "classes": args.classes, "weights": args.weights,
        "score_threshold": args.score_threshold, "seg_size": args.seg_size,
        "fusion": args.fusion, "model_sizes": args.model_sizes,
        "matting": args.matting, "refine": args.refine, "trimap_band": args.trimap_band,
        "background": args.background, "format": args.format, "quality": args.quality,
        "max_pixels": args.max_pixels,
        "crop": getattr(args, "crop", None) or None,  # box hints (cutout.jobs.boxes)
        **(getattr(args, "pipeline_extra", None) or {}),  # job-file fields without a flag
    }
    try:
        return PipelineOptions(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from exc


def validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'spec'}: {error['msg']}" for error in exc.errors()
    )
