"""GrabCut refinement: recovers subject parts the network missed, by colour."""
from __future__ import annotations

import numpy as np

from cutout.jobs.spec import PipelineOptions
from cutout.workers.pipeline import Pipeline
from cutout.workers.refine import refine_with_grabcut


def _scene(seed: int = 0):
    """An orange square subject on a noisy blue-green background."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((200, 240, 3), np.uint8)
    rgb[...] = np.clip(rng.normal((40, 120, 160), 12, (200, 240, 3)), 0, 255).astype(np.uint8)
    subject = np.zeros((200, 240), bool)
    subject[40:160, 60:180] = True
    rgb[subject] = np.clip(rng.normal((230, 130, 30), 12, (int(subject.sum()), 3)), 0, 255)
    return rgb, subject


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_refinement_recovers_a_missed_half_of_the_subject():
    rgb, subject = _scene()
    mask = np.zeros(subject.shape, np.float32)
    mask[40:160, 60:120] = 1.0  # the network saw only the left half confidently...
    mask[40:160, 120:180] = 0.3  # ...and hesitated over the right half
    refined, skipped = refine_with_grabcut(rgb, mask)
    assert skipped is None
    assert _iou(mask >= 0.5, subject) < 0.6
    assert _iou(refined >= 0.5, subject) > 0.95


def test_refinement_keeps_the_mask_when_nothing_is_sure():
    rgb, subject = _scene()
    unsure = np.full(subject.shape, 0.6, np.float32)
    refined, skipped = refine_with_grabcut(rgb, unsure)
    assert skipped and skipped.startswith("refine-skipped")
    np.testing.assert_array_equal(refined, unsure)


def test_refine_option_is_recorded_and_can_be_turned_off():
    rgb, subject = _scene()
    mask = np.where(subject, 1.0, 0.0).astype(np.float32)
    mask[40:160, 120:180] = 0.3
    on = Pipeline(PipelineOptions(model="threshold", refine="grabcut", matting="none")).finish(rgb, mask)
    off = Pipeline(PipelineOptions(model="threshold", matting="none")).finish(rgb, mask)  # auto: off
    assert "refine" in on.timings and "refine" not in off.timings
    assert _iou(on.alpha >= 0.5, subject) > 0.95 > _iou(off.alpha >= 0.5, subject)
