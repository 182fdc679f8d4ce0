"""One stage driver: every caller (shards, ``cutout run``, the Python API, ``cutout eval``)
runs each stage through ``run_stage``, which times it and labels a failure with the stage it
happened in. A record therefore always names the stage that failed, instead of one guessed
from which timings happen to exist.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

from cutout.jobs.errors import CutoutError

T = TypeVar("T")

# In pipeline order; every name a record's ``stage`` or ``timings`` can carry from the pipeline.
STAGES = ("decode", "box", "segment", "calibrate", "select", "refine", "trimap", "matte", "objects",
          "foreground", "composite", "encode")


def run_stage(timings: dict[str, float], stage: str, func: Callable[..., T], *args, **kwargs) -> T:
    """``func(*args, **kwargs)``, its seconds added to ``timings[stage]``; any failure leaves as
    a ``CutoutError`` whose ``stage`` is this one (the original exception is its cause)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    start = time.perf_counter()
    try:
        return func(*args, **kwargs)
    except CutoutError as exc:
        stage_error(exc, stage)
        raise
    except Exception as exc:  # noqa: BLE001 - labelled here, recorded by the caller
        raise stage_error(exc, stage) from exc
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def stage_error(exc: Exception, stage: str) -> CutoutError:
    """``exc`` as a CutoutError labelled with ``stage``; a label set by an inner stage is kept."""
    if not isinstance(exc, CutoutError):
        error = CutoutError(f"{type(exc).__name__}: {exc}", stage=stage)
        error.stage_labelled = True
        return error
    if not getattr(exc, "stage_labelled", False):
        exc.stage = stage
        exc.stage_labelled = True
    return exc
