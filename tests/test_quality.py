"""Quality signals per output (issue 9, item 4): measured from the pipeline's own arrays,
flagged by named thresholds, carried to the record and counted per shard."""
from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.records import QUALITY_FLAGS, ItemRecord
from cutout.jobs.spec import JobSpec, PipelineOptions
from cutout.workers import items, quality, shard
from cutout.workers.pipeline import ItemOutcome, Pipeline, PipelineInput

H, W = 60, 80


def disk(radius: float = 20.0) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (((yy - H / 2) ** 2 + (xx - W / 2) ** 2) < radius ** 2).astype(np.float32)


def photo_of_disk() -> np.ndarray:
    rgb = np.full((H, W, 3), 200, np.uint8)
    rgb[disk() > 0] = (220, 30, 30)
    return rgb


def flags(alpha, mask=None, trimap=None, notes=()):
    """The flags one rule raises (the score's likely_wrong is tested on its own below)."""
    raised = quality.measure(alpha, alpha if mask is None else mask, trimap, list(notes), rgb=photo_of_disk())[1]
    return [flag for flag in raised if flag != "likely_wrong"]


def test_a_clean_cutout_raises_no_flag():
    measured, raised = quality.measure(disk(), disk(), None, [], rgb=photo_of_disk())
    assert raised == []
    assert measured["alpha_coverage"] == pytest.approx(np.pi * 400 / (H * W), abs=0.01)
    assert measured["confidence"] == 1.0 and measured["unknown_share"] == 0.0


def test_each_flag_has_its_trigger():
    assert flags(np.zeros((H, W), np.float32)) == ["empty_alpha"]
    assert flags(np.ones((H, W), np.float32)) == ["full_frame_alpha"]
    wide = np.full((H, W), 128, np.uint8)
    assert flags(disk(), trimap=wide) == ["wide_unknown_band"]
    unsure = np.where(disk() > 0, 0.7, 0.3).astype(np.float32)
    assert "low_confidence" in flags(disk(), mask=unsure)
    assert flags(disk(), notes=["matting-skipped: unknown band covers 40%"]) == ["matting_skipped"]
    assert flags(disk(), notes=["matting-fallback: solver failed"]) == ["matting_degraded"]


def two_disks(second_radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    first = ((yy - 30) ** 2 + (xx - 20) ** 2) < 12 ** 2
    second = ((yy - 30) ** 2 + (xx - 60) ** 2) < second_radius ** 2
    return (first | second).astype(np.float32)


def test_two_separate_objects_of_similar_size_are_flagged_multiple_objects():
    measured, raised = quality.measure(two_disks(11), two_disks(11), None, [])
    assert measured["second_object"] == pytest.approx(121 / 144, abs=0.08)
    assert measured["joined_object"] == pytest.approx(measured["second_object"], abs=0.1)
    assert "multiple_objects" in raised
    small, raised = quality.measure(two_disks(3), two_disks(3), None, [])  # a speck beside the subject
    assert small["second_object"] < 0.1 and "multiple_objects" not in raised


def test_two_objects_joined_by_a_narrow_strip_still_count_as_two():
    joined = two_disks(11)
    joined[29:31, 20:60] = 1.0  # a 2-px bridge: one connected part
    measured, raised = quality.measure(joined, joined, None, [])
    assert measured["second_object"] == 0.0
    assert measured["joined_object"] > 0.5 and "multiple_objects" in raised


def test_the_score_ranks_a_doubtful_cutout_below_a_clean_one():
    clean, raised = quality.measure(disk(), disk(), None, [], rgb=photo_of_disk())
    assert clean["edge_alignment"] == 1.0 and "likely_wrong" not in raised
    # two objects whose outlines cross flat colour, one touching the frame, grey alpha, and a
    # calibration ramp that added a third of the kept area: what the score reads as doubtful
    unrefined = np.where(two_disks(11) > 0, 0.6, 0.0).astype(np.float32)
    unrefined[:, :3] = 0.6
    doubtful, raised = quality.measure(unrefined, unrefined, None, [], rgb=np.full((H, W, 3), 90, np.uint8),
                                       ramp=(0.05, 0.55))
    assert doubtful["ramp_gain"] == 1.0 and doubtful["edge_alignment"] == 0.0
    assert 0.0 <= doubtful["score"] < quality.LIKELY_WRONG_BELOW < clean["score"] <= 1.0
    assert "likely_wrong" in raised and "multiple_objects" in raised


def test_border_kinship_tells_background_kept_from_a_subject_cut_by_the_frame():
    """A red subject standing on the bottom edge of a grey room: kept alone, its edge pixels are
    red and the unkept edge grey (no kinship); kept with the grey floor along the whole bottom
    edge, the kept edge is coloured like the edge left out (background kept)."""
    rgb = np.full((H, W, 3), 120, np.uint8)
    rgb[20:, 30:50] = (220, 30, 30)
    subject = np.zeros((H, W), np.float32)
    subject[20:, 30:50] = 1.0
    with_floor = subject.copy()
    with_floor[45:, :] = 1.0
    cut, _ = quality.measure(subject, subject, None, [], rgb=rgb)
    kept, _ = quality.measure(with_floor, with_floor, None, [], rgb=rgb)
    assert cut["border_contact"] > 0.0 and cut["border_kinship"] == 0.0
    assert kept["border_kinship"] == pytest.approx(kept["border_contact"] - 20 / (2 * (H + W)), abs=0.01)
    assert kept["score"] < cut["score"]


def test_the_score_model_version_is_part_of_the_config_hash(monkeypatch):
    from cutout.jobs import records

    before = PipelineOptions().config_hash()
    monkeypatch.setattr(records, "QUALITY_MODEL", "another-model")
    assert PipelineOptions().config_hash() != before


def test_flags_are_the_recorded_vocabulary():
    raised = set(flags(np.zeros((H, W), np.float32), mask=np.full((H, W), 0.5, np.float32),
                       trimap=np.full((H, W), 128, np.uint8),
                       notes=["matting-skipped: x", "matting-fallback: y"]))
    assert raised <= set(QUALITY_FLAGS) and len(raised) == 5


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model_says, flag", [(0.0, "empty_alpha"), (1.0, "full_frame_alpha")])
def test_run_flags_a_blank_or_whole_frame_output(monkeypatch, model_says, flag):
    """The defect-9 shape: an output with nothing (or everything) kept is done, but flagged."""
    monkeypatch.setattr(Pipeline, "segment_raw",
                        lambda self, images: [np.full(i.shape[:2], model_says, np.float32) for i in images])
    rgb = np.full((H, W, 3), 120, np.uint8)
    (outcome,) = Pipeline(PipelineOptions(model="threshold")).run([PipelineInput("x.png", _png(rgb))])
    assert outcome.ok and flag in outcome.flags
    assert set(outcome.quality) == {"alpha_coverage", "unknown_share", "confidence", "second_object", "joined_object",
                                    "border_contact", "refine_change", "ramp_gain", "grey_share",
                                    "edge_alignment", "border_kinship", "score"}
    assert 0.0 <= outcome.quality["score"] <= 1.0


def test_run_measures_a_good_cutout():
    rgb = np.full((H, W, 3), 200, np.uint8)
    rgb[disk() > 0] = (220, 30, 30)
    (outcome,) = Pipeline(PipelineOptions(model="threshold")).run([PipelineInput("x.png", _png(rgb))])
    assert outcome.ok and outcome.flags == []
    assert 0.2 < outcome.quality["alpha_coverage"] < 0.3


def test_records_and_shard_stats_carry_quality(tmp_path):
    spec = JobSpec(sources=(str(tmp_path),), destination=f"file://{tmp_path}/out")
    records = []
    for name, flagged in (("a", ["empty_alpha", "low_confidence"]), ("b", []), ("c", ["empty_alpha"])):
        record = ItemRecord(input_uri=f"file://{tmp_path}/{name}.jpg", status="failed")
        outcome = ItemOutcome(ok=True, data=b"png bytes", extension=".png",
                              quality={"alpha_coverage": 0.001, "confidence": 0.5}, flags=flagged)
        item = SimpleNamespace(uri=record.input_uri, output_uri=f"file://{tmp_path}/out/{name}.png")
        items.apply_outcome(item, record, outcome)
        records.append(record)
    assert records[0].status == "done" and records[0].flags == ["empty_alpha", "low_confidence"]
    assert records[0].quality == {"alpha_coverage": 0.001, "confidence": 0.5}
    assert json.loads(records[0].model_dump_json())["flags"] == ["empty_alpha", "low_confidence"]
    failed = ItemRecord(input_uri="x", status="failed", flags=["empty_alpha"])  # not a done output
    stats = shard.shard_stats(spec, "s0", records + [failed], 0.0, "w", 1)
    assert stats.flag_counts == {"empty_alpha": 2, "low_confidence": 1}


def test_roc_auc_counts_pairs_ranked_right_and_halves_ties():
    from cutout.workers.metrics import roc_auc

    assert roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert roc_auc([0.5, 0.9, 0.5, 0.1], [True, True, False, False]) == (1 + 1 + 0.5 + 1) / 4
    assert np.isnan(roc_auc([0.1, 0.2], [False, False]))
