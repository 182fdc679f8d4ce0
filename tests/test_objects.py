"""The main object kept when the network kept several (``cutout.workers.objects``)."""
from __future__ import annotations

import numpy as np
import pytest

from cutout.jobs.spec import PipelineOptions
from cutout.workers.objects import MAIN_OBJECT_MIN, keep_main_object


def disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2).astype(np.float32)


@pytest.mark.parametrize("scale", [1, 4])  # 4: larger than the 512-px working copy
def test_of_two_similar_objects_the_one_nearer_the_centre_is_kept(scale):
    shape = (200 * scale, 300 * scale)
    central = disc(shape, (100 * scale, 160 * scale), 40 * scale)
    aside = disc(shape, (64 * scale, 48 * scale), 44 * scale)  # larger, in a corner
    alpha, note = keep_main_object(np.maximum(central, aside))
    assert note.startswith("main-object: kept the main one of 2 parts")
    assert np.array_equal(alpha, central)


def test_a_larger_object_off_centre_beats_a_small_one_in_the_middle():
    shape = (200, 300)
    big = disc(shape, (100, 70), 60)
    small = disc(shape, (100, 195), 40)  # its core 0.37 of the big one's, centred
    alpha, _note = keep_main_object(np.maximum(big, small), min_second=0.3)
    assert np.array_equal(alpha, big)


def test_one_object_with_thin_limbs_and_a_small_speck_is_left_alone():
    shape = (200, 300)
    body = disc(shape, (100, 150), 50)
    body[95:105, 20:150] = 1.0  # an arm thinner than the neck: cut in the working copy only
    body[10:16, 280:286] = 1.0  # a speck far smaller than the body
    alpha, note = keep_main_object(body)
    assert note is None and alpha is body


def test_a_collection_of_similar_objects_is_left_whole():
    """Coins on a table: no part is the subject, so every one stays (flagged multiple_objects)."""
    shape = (200, 300)
    coins = np.zeros(shape, np.float32)
    for row in (50, 150):
        for col in (50, 150, 250):
            coins = np.maximum(coins, disc(shape, (row, col), 35))
    alpha, note = keep_main_object(coins)
    assert alpha is coins and note is None


def test_a_part_below_the_size_rule_is_kept():
    shape = (200, 300)
    first = disc(shape, (100, 100), 50)
    second = disc(shape, (100, 230), 50 * (MAIN_OBJECT_MIN * 0.8) ** 0.5)
    both = np.maximum(first, second)
    alpha, note = keep_main_object(both)
    assert alpha is both and note is None


def test_two_objects_joined_by_a_neck_are_cut_midway_and_the_soft_edge_stays():
    shape = (200, 400)
    left = disc(shape, (100, 180), 60)
    right = disc(shape, (100, 320), 60)
    joined = np.maximum(left, right)
    joined[96:104, 180:320] = 1.0  # a strip narrower than the neck
    joined = np.clip(joined + 0.3 * disc(shape, (100, 180), 63) * (1 - joined), 0, 1)  # a soft rim
    alpha, note = keep_main_object(joined)
    assert note is not None
    assert alpha[100, 180] == 1.0 and alpha[100, 320] == 0.0
    assert alpha[100, 240] == 1.0 and alpha[100, 260] == 0.0  # the neck split near its middle (250)
    assert alpha[100, 118] == pytest.approx(0.3)  # the kept part's soft rim


def test_the_pipeline_keeps_the_main_object_unless_told_all():
    from cutout.workers.pipeline import Pipeline, PipelineInput

    rgb = np.full((96, 160, 3), 235, np.uint8)
    rgb[28:68, 60:100] = (30, 40, 160)  # centred
    rgb[10:46, 6:42] = (150, 30, 30)  # top left, a little smaller
    outcomes = {}
    for objects in ("main", "all"):
        options = PipelineOptions(model="threshold", matting="none", refine="none", objects=objects)
        (outcomes[objects],) = Pipeline(options).run([PipelineInput("p", rgb=rgb)], encode=False, keep_result=True)
    main, every = outcomes["main"].result.alpha, outcomes["all"].result.alpha
    assert every[20, 20] > 0.9 and every[48, 80] > 0.9
    assert main[20, 20] == 0.0 and main[48, 80] > 0.9
    assert "objects" in outcomes["main"].timings
    assert any(note.startswith("main-object") for note in outcomes["main"].notes)
    assert "multiple_objects" in outcomes["all"].flags and "multiple_objects" not in outcomes["main"].flags


def test_objects_is_part_of_the_config_hash():
    hashes = {PipelineOptions(objects=objects).config_hash() for objects in ("main", "all")}
    assert len(hashes) == 2
