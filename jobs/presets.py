"""Presets: named points on the measured quality-per-CPU frontier (docs/results.md).

``--preset fast|balanced|best`` (default ``balanced``) fills every PipelineOptions field the
user did not set explicitly, before validation, so the resolved values are what a job stores
and hashes. The table lives here, in the contracts half, because the submitter hashes the
job and must resolve it without importing the workers.

Each entry is split in two: ``common`` applies whatever the model; ``model_settings`` applies
only when the job runs the preset's own model (sizes, ramp and refinement were chosen for that
network, so another model keeps the defaults its registry entry measured for it).
Values were chosen by cross-validation over both visible sets (benchmarks/tune_cv.py): the
setting within each preset's CPU budget whose criterion on the WORSE of the two halves is lowest
(the per-half choices disagreed: MODNet fusions won on one half and lost badly on the other).
"""
from __future__ import annotations

from typing import Any, Literal

PresetName = Literal["fast", "balanced", "best"]
DEFAULT_PRESET: PresetName = "balanced"

PRESETS: dict[str, dict[str, Any]] = {
    # CV (docs/results.md): one IS-Net pass at 640, raw. Every cheaper network (u2netp, MODNet,
    # their fusions) and IS-Net at 448/512 did worse on the half they were not tuned on.
    "fast": {
        "model": "isnet-general",
        "common": {"matting": "none", "trimap_band": 0.01},
        "model_settings": {"seg_sizes": (640,), "mask_ramp": (0.0, 1.0), "refine": "none"},
    },
    # CV pick within half of rembg -a's CPU (and within all of it): one pass at 768, IS-Net's
    # grey mapped up (ramp 0.05..0.55), GrabCut refinement, closed-form matting in a 0.5 % band.
    "balanced": {
        "model": "isnet-general",
        "common": {"matting": "closed-form", "trimap_band": 0.005},
        "model_settings": {"seg_sizes": (768,), "mask_ramp": (0.05, 0.55), "refine": "grabcut"},
    },
    # balanced with the 768/896/1024 size ensemble (about twice the model CPU). Not a CV
    # candidate (896/1024 masks could not be cached in time); measured before: the ensemble's raw
    # mask beats one pass on both sets (GrabCut IoU 0.877 vs 0.866 at 768).
    "best": {
        "model": "isnet-general",
        "common": {"matting": "closed-form", "trimap_band": 0.005},
        "model_settings": {"seg_sizes": (768, 896, 1024), "mask_ramp": (0.05, 0.55),
                           "refine": "grabcut"},
    },
}


def apply_preset(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (what the caller set) completed from its preset; explicit values win."""
    name = fields.get("preset") or DEFAULT_PRESET
    if name not in PRESETS:
        from cutout.jobs.errors import ConfigError

        raise ConfigError(f"unknown preset {name!r}: use {', '.join(PRESETS)}")
    preset = PRESETS[name]
    resolved = {"preset": name, **fields}
    resolved.setdefault("model", preset["model"])
    for key, value in preset["common"].items():
        resolved.setdefault(key, value)
    if resolved["model"] == preset["model"]:
        for key, value in preset["model_settings"].items():
            resolved.setdefault(key, value)
    return resolved
