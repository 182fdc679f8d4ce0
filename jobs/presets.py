"""Presets: named points on the measured quality-per-CPU frontier (docs/results.md).

``--preset fast|balanced|best`` (default ``balanced``) fills every PipelineOptions field the
user did not set explicitly, before validation, so the resolved values are what a job stores
and hashes. The table lives here, in the contracts half, because the submitter hashes the
job and must resolve it without importing the workers.

Each entry is split in two: ``common`` applies whatever the model; ``model_settings`` applies
only when the job runs the preset's own model (sizes, ramp and refinement were chosen for that
network, so another model keeps the defaults its registry entry measured for it).
Values were chosen by cross-validation over both visible sets (benchmarks/tune_cv.py, second
study in docs/results.md): the setting within each preset's CPU budget (1/4, 1/2 and 1x of
``rembg p -a``) whose criterion on the WORSE of the two halves is lowest (the per-half choices
disagree on details; MODNet fusions win on one half and lose badly on the other).
"""
from __future__ import annotations

from typing import Any, Literal

PresetName = Literal["fast", "balanced", "best", "auto"]
DEFAULT_PRESET: PresetName = "balanced"

PRESETS: dict[str, dict[str, Any]] = {
    # CV (docs/results.md, second study): the mean of IS-Net at 512 and u2netp at 320 (two cheap
    # networks that fail on different photos), grey mapped up (ramp 0.05..0.55), GrabCut,
    # closed-form matting in a 1 % band. Needs both weights (`cutout models fetch u2netp`).
    "fast": {
        "model": "isnet-general+u2netp",
        "common": {"matting": "closed-form", "trimap_band": 0.01},
        "model_settings": {"fusion": "mean", "model_sizes": (("isnet-general", 512),),
                           "mask_ramp": (0.05, 0.55), "refine": "grabcut"},
    },
    # CV pick within half of rembg -a's CPU: one pass at 896 (no single size did better on both
    # halves; 768 failed on half B's photos), ramp 0.05..0.55, GrabCut, matting in a 0.5 % band.
    # No escalation: rerunning low-scoring outputs with `best` was chosen on neither half
    # (benchmarks/quality_cv.py, nested study); `--escalate best --escalate-below 0.3` opts in.
    "balanced": {
        "model": "isnet-general",
        "common": {"matting": "closed-form", "trimap_band": 0.005},
        "model_settings": {"seg_sizes": (896,), "mask_ramp": (0.05, 0.55), "refine": "grabcut"},
    },
    # CV pick within rembg -a's CPU: passes at 768 and 896 combined by max (IS-Net fails by
    # leaving parts grey, at different sizes on different photos), ramp, no GrabCut (it did not
    # help this mask on the worse half), matting in a 1 % band.
    "best": {
        "model": "isnet-general",
        "common": {"matting": "closed-form", "trimap_band": 0.01},
        "model_settings": {"seg_sizes": (768, 896), "size_rule": "max", "mask_ramp": (0.05, 0.55),
                           "refine": "none"},
    },
}

# The cascade (benchmarks/quality_cv.py, docs/results.md): `fast` on every photo, and the photos
# whose quality score is below 0.4 (about a sixth) run again with `balanced`; the higher score is
# kept. Each half chose its threshold on out-of-fold scores (the lowest criterion against `best`
# within `balanced`'s CPU): 0.8 and 0.4. 0.8 reruns half the photos and costs more than
# `balanced` itself (estimated 4.47-4.52 against 4.47; measured 6-18 % more), so 0.4 ships.
# Rerunning also where its two networks disagree (`--escalate-apart 0.3`, half B's pick in the
# nested CV, quality_cv.py --disagreement) was better held out on half A but measured as costly
# as `balanced` itself, whole process (bench_cost.py, alphamatting photos: 5.46 CPU-s against
# 4.69 for `balanced` and 3.95 for `auto` without it), for GrabCut IoU +0.0014: an option only.
PRESETS["auto"] = {
    **PRESETS["fast"],
    "model_settings": {**PRESETS["fast"]["model_settings"], "escalate": "balanced", "escalate_below": 0.4},
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
