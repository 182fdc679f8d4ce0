"""Box hints: parsing and formats, per-object InvalidBoxError, list-file expansion, the
component rule, and the box path of the pipeline on a synthetic photo (classical model)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.boxes import BoxExpander, BoxHint, box_of, image_uri_of, parse_box, parse_boxes
from cutout.jobs.errors import ConfigError, InvalidBoxError
from cutout.jobs.sources import iter_source_items
from cutout.jobs.spec import PipelineOptions


# --- parsing and formats ------------------------------------------------------------------------
@pytest.mark.parametrize("value, box_format, pixels", [
    ("12,30,200,180", "xywh", (12, 30, 212, 210)),
    ([12, 30, 200, 180], "xywh", (12, 30, 212, 210)),
    ("[12 30 212 210]", "xyxy", (12, 30, 212, 210)),
    ([0.1, 0.25, 0.5, 0.5], "xywhn", (40, 75, 240, 225)),
    ("0.1,0.25,0.6,0.75", "xyxyn", (40, 75, 240, 225)),
    ("10.4,20.6,30.2,40.1", "xywh", (10, 20, 41, 61)),  # fractional corners: the pixels they touch
])
def test_each_format_gives_its_pixels(value, box_format, pixels):
    assert parse_box(value, box_format).to_pixels(400, 300) == pixels


@pytest.mark.parametrize("value, box_format", [
    ("12,30,200", "xywh"), ("a,b,c,d", "xywh"), ([1, 2, 3, float("nan")], "xywh"),
    ("0.1,0.2,1.5,0.3", "xywhn"), ({"x": 1}, "xywh"), ("", "xywh"),
])
def test_a_value_that_does_not_fit_its_format_is_refused_clearly(value, box_format):
    with pytest.raises(ConfigError, match="box"):
        parse_box(value, box_format)


def test_an_unknown_format_is_refused():
    with pytest.raises(ConfigError, match="xywh, xyxy, xywhn, xyxyn"):
        parse_box("1,2,3,4", "cxcywh")


@pytest.mark.parametrize("hint, why", [
    (BoxHint((50, 50, 10, 10), "xyxy"), "inverted"),
    (BoxHint((10, 10, 0, 5), "xywh"), "empty"),
    (BoxHint((500, 10, 20, 20), "xywh"), "outside"),
    (BoxHint((-40, -40, 30, 30), "xywh"), "outside"),
])
def test_boxes_that_name_no_pixels_are_invalid_box_errors(hint, why):
    with pytest.raises(InvalidBoxError, match=why) as caught:
        hint.to_pixels(320, 240)
    assert caught.value.stage == "box" and caught.value.permanent


def test_a_box_partly_outside_is_clipped_to_the_image():
    assert BoxHint((-10, 200, 50, 100)).to_pixels(320, 240) == (0, 200, 40, 240)


def test_one_cell_may_hold_several_boxes():
    boxes = parse_boxes("[[1,2,3,4],[5,6,7,8]]")
    assert [b.values for b in boxes] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert len(parse_boxes([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 1, 1]])) == 3


# --- list files: one input per box --------------------------------------------------------------
def test_rows_of_one_image_become_one_item_per_box_with_their_label(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "list.csv").write_text(
        'uri,bbox,label\na.jpg,"1,2,30,40",cat\nb.jpg,,\na.jpg,"5,6,7,8",dog\n')
    items = list(iter_source_items([str(tmp_path / "list.csv")]))
    assert [i.rel_key for i in items] == ["a.box-0.jpg", "b.jpg", "a.box-1.jpg"]
    first, plain, second = items
    assert first.uri == str(tmp_path / "a.jpg") + "#box-0" and second.uri.endswith("a.jpg#box-1")
    assert image_uri_of(first.uri, first.extra) == str(tmp_path / "a.jpg")
    assert first.extra["label"] == "cat" and second.extra["label"] == "dog"
    assert box_of(first.extra) == BoxHint((1, 2, 30, 40), "xywh")
    assert plain.extra is None or box_of(plain.extra) is None


def test_jsonl_and_parquet_boxes_are_lists_and_a_row_may_list_several(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "l.jsonl").write_text(
        json.dumps({"uri": "s3://b/p.png", "box": [[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]}) + "\n")
    items = list(iter_source_items([str(tmp_path / "l.jsonl")],
                                   boxes=BoxExpander("box", "xyxyn")))
    assert [i.uri for i in items] == ["s3://b/p.png#box-0", "s3://b/p.png#box-1"]
    assert [i.rel_key for i in items] == ["b/p.box-0.png", "b/p.box-1.png"]
    assert box_of(items[1].extra).to_pixels(100, 100) == (50, 50, 90, 90)
    pq.write_table(pa.table({"url": ["s3://b/q.jpg"], "bbox": [[1.0, 2.0, 3.0, 4.0]],
                             "id": [77], "category": ["cup"]}), tmp_path / "l.parquet")
    (item,) = iter_source_items([str(tmp_path / "l.parquet")])
    assert item.uri == "s3://b/q.jpg#77" and item.rel_key == "b/q.77.jpg"  # the row's id names it
    assert item.extra["category"] == "cup" and item.extra["box"] == [1.0, 2.0, 3.0, 4.0]


def test_a_malformed_box_in_a_list_file_names_the_file(tmp_path):
    (tmp_path / "l.csv").write_text('uri,bbox\na.jpg,"1,2,3"\n')
    with pytest.raises(ConfigError, match="l.csv.*four"):
        list(iter_source_items([str(tmp_path / "l.csv")]))


# --- the component rule -------------------------------------------------------------------------
def test_components_outside_the_box_are_dropped_and_the_object_is_kept():
    from cutout.workers.boxes import Region, keep_box_components

    mask = np.zeros((100, 200), np.float32)
    mask[20:80, 20:90] = 1.0  # the boxed object, spilling a little out of its box
    mask[30:60, 130:180] = 0.9  # a neighbour in the crop's margin, outside the box
    kept = keep_box_components(mask, Region(25, 25, 85, 85), spill=0.1, min_inside=0.0)
    assert kept[30:60, 130:180].max() == 0.0
    assert kept[30:75, 30:80].min() == 1.0
    assert kept[20:80, 20:25].sum() > 0  # within the spill: kept
    assert kept[:, :19].max() == 0.0


def test_min_inside_drops_a_component_that_only_touches_the_box():
    from cutout.workers.boxes import Region, keep_box_components

    mask = np.zeros((100, 200), np.float32)
    mask[10:90, 90:190] = 1.0  # mostly outside the box: it only reaches 10 px into it
    box = Region(10, 10, 100, 90)
    assert keep_box_components(mask, box, spill=0.0, min_inside=0.0).sum() > 0
    assert keep_box_components(mask, box, spill=0.0, min_inside=0.5).sum() == 0


# --- the box path of the pipeline (classical models: no weights needed) ------------------------
def _two_objects() -> np.ndarray:
    """A grey card with a blue disc on the left and a red square on the right."""
    rgb = np.full((160, 240, 3), 200, np.uint8)
    yy, xx = np.mgrid[0:160, 0:240]
    rgb[(yy - 80) ** 2 + (xx - 60) ** 2 < 35 ** 2] = (30, 60, 200)
    rgb[50:110, 150:210] = (200, 40, 30)
    return rgb


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_box_cuts_out_its_object_only_at_the_input_size():
    from cutout.workers.boxes import box_region, cut_out_box
    from cutout.workers.pipeline import Pipeline

    rgb = _two_objects()
    pipeline = Pipeline(PipelineOptions(model="grabcut", matting="none", background="color:#00ff00"))
    result = cut_out_box(pipeline, rgb, box_region((140, 40, 80, 80), 240, 160))
    assert result.alpha.shape == (160, 240) and result.image.shape == (160, 240, 3)
    assert result.alpha[60:100, 160:200].mean() > 0.9  # the red square
    assert result.alpha[:, :120].max() == 0.0  # the disc and everything far from the box
    assert (result.image[5, 5] == (0, 255, 0)).all()  # background colour outside the object


def test_grabcut_from_a_box_that_fills_the_photo_still_finds_the_object():
    """GrabCut learns the background outside the box: a whole-photo box leaves it the frame's edge."""
    from cutout.workers.boxes import box_region, cut_out_box
    from cutout.workers.pipeline import Pipeline

    rgb = np.full((160, 240, 3), 20, np.uint8)
    rgb[40:120, 60:180] = (220, 40, 40)
    pipeline = Pipeline(PipelineOptions(model="grabcut", matting="none"))
    result = cut_out_box(pipeline, rgb, box_region((0, 0, 240, 160), 240, 160))
    assert result.alpha[50:110, 70:170].min() > 0.9
    assert result.alpha[:20].max() < 0.1 and result.alpha[:, :40].max() < 0.1


def test_a_network_that_misses_the_boxed_object_falls_back_to_grabcut_from_the_box(monkeypatch):
    """The network kept a speck of the box (a pot under a bush): GrabCut from the box is used."""
    from cutout.workers.boxes import MIN_FILL, box_region, cut_out_box
    from cutout.workers.pipeline import Pipeline

    def speck(image):  # 10 x 10 pixels at the crop's centre, inside the red square
        mask = np.zeros(image.shape[:2], np.float32)
        mask[image.shape[0] // 2 - 5:image.shape[0] // 2 + 5, image.shape[1] // 2 - 5:image.shape[1] // 2 + 5] = 1.0
        return mask

    rgb = _two_objects()
    monkeypatch.setattr(Pipeline, "segment_raw", lambda self, images: [speck(image) for image in images])
    pipeline = Pipeline(PipelineOptions(model="u2netp", matting="none"))
    result = cut_out_box(pipeline, rgb, box_region((140, 40, 80, 80), 240, 160))
    assert result.notes[0].startswith("box-underfilled")
    assert (result.alpha[40:120, 140:220] >= 0.5).mean() > MIN_FILL
    assert result.alpha[60:100, 160:200].mean() > 0.9 and result.alpha[:, :120].max() == 0.0


def test_crop_writes_the_box_with_its_margin():
    from cutout.workers.boxes import BOX_MARGIN, box_region, cut_out_box
    from cutout.workers.pipeline import Pipeline

    pipeline = Pipeline(PipelineOptions(model="grabcut", matting="none", crop=True))
    result = cut_out_box(pipeline, _two_objects(), box_region((20, 40, 80, 80), 240, 160),
                         crop_output=True)
    grow = round(80 * BOX_MARGIN)
    assert result.image.shape == (80 + 2 * grow, 80 + grow + min(20, grow), 4)


def test_an_invalid_box_fails_alone_and_an_image_is_decoded_once():
    from cutout.workers.pipeline import Pipeline

    from cutout.workers.pipeline import PipelineInput

    data = _png(_two_objects())
    pipeline = Pipeline(PipelineOptions(model="grabcut", matting="none"))
    boxes = [BoxHint((20, 40, 80, 80)), BoxHint((900, 900, 5, 5)), BoxHint((140, 40, 80, 80)), None]
    outcomes = pipeline.run([PipelineInput("p.png", data, box=box) for box in boxes[:3]]
                            + [PipelineInput("q.png", _png(_two_objects()))])
    assert [o.ok for o in outcomes] == [True, False, True, True]
    assert outcomes[1].error.error_class == "InvalidBoxError" and outcomes[1].error.stage == "box"
    assert "decode" in outcomes[0].timings and "decode" not in outcomes[2].timings
    assert (outcomes[0].width, outcomes[0].height) == (240, 160)
    left = np.asarray(Image.open(io.BytesIO(outcomes[0].data)))[..., 3]
    right = np.asarray(Image.open(io.BytesIO(outcomes[2].data)))[..., 3]
    assert left[:, 130:].max() == 0 and left[70:90, 50:70].min() > 200
    assert right[:, :120].max() == 0 and right[70:90, 170:190].min() > 200


def test_a_mask_that_runs_out_of_the_box_lets_grabcut_drop_the_neighbour():
    """A boxed head whose mask carries on into the shirt below the box: the shirt outside the
    box teaches GrabCut its colours, and its part inside the box goes too."""
    from cutout.workers.boxes import Region, crossing_share, select_and_refine

    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal(0, 4, (200, 160, 3)) + (90, 140, 90), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:200, 0:160]
    head = (yy - 70) ** 2 + (xx - 80) ** 2 < 40 ** 2
    shirt = (yy > 110) & (abs(xx - 80) < 70)
    rgb[head] = (225, 180, 150)
    rgb[shirt & ~head] = (30, 40, 170)
    mask = (head | shirt).astype(np.float32)  # the network took head and shirt as one subject
    box = Region(30, 20, 130, 140)  # around the head: its bottom side cuts through the shirt
    assert crossing_share(mask, box) > 0.9
    kept, notes = select_and_refine(rgb, mask, box, refine=True)
    assert any(note.startswith("box-crossed") for note in notes)
    assert kept[head].mean() > 0.95
    shirt_inside = shirt & ~head & (yy < 140) & (xx >= 30) & (xx < 130)
    assert kept[shirt_inside].mean() < 0.1  # the shirt inside the box
    assert kept[140:, :].max() == 0.0  # nothing below the box
    unchanged, notes = select_and_refine(rgb, mask, box, refine=True, crossing=9.0)
    assert not notes and unchanged[shirt_inside].mean() > 0.9


def test_a_failing_box_stage_is_named_and_spares_the_other_boxes(monkeypatch):
    from cutout.workers import boxes
    from cutout.workers.pipeline import Pipeline, PipelineInput

    real = boxes.box_region

    def failing(hint, width, height):
        if tuple(hint) == (1, 1, 50, 50):
            raise RuntimeError("injected failure")
        return real(hint, width, height)

    monkeypatch.setattr(boxes, "box_region", failing)
    data = _png(_two_objects())
    outcomes = Pipeline(PipelineOptions(model="grabcut", matting="none")).run(
        [PipelineInput("p.png", data, box=box) for box in ((20, 40, 80, 80), (1, 1, 50, 50))])
    assert outcomes[0].ok and not outcomes[1].ok
    assert outcomes[1].error.stage == "box" and "injected failure" in str(outcomes[1].error)


def _object_and_neighbour() -> np.ndarray:
    """A mask of a boxed object (rows 20-100, columns 20-100 of a 120 x 160 crop) joined by a
    4-px strip (a hand) to a neighbour that stands mostly outside the box, right of column 110."""
    mask = np.zeros((120, 160), np.float32)
    mask[20:100, 20:100] = 1.0  # the object, inside the box
    mask[60:64, 100:125] = 1.0  # the strip joining them
    mask[10:110, 118:160] = 1.0  # the neighbour: columns 118-159, of which 118-129 lie inside
    return mask


def test_a_neighbour_reaching_into_the_box_is_dropped_and_the_object_stays():
    from cutout.workers.boxes import Region, neighbour_parts

    box = Region(10, 10, 130, 110)
    owned = neighbour_parts(_object_and_neighbour(), box)
    assert owned is not None
    assert owned[20:110, 125:160].all()  # the neighbour (its part inside the box included)
    assert not owned[20:100, 20:100].any()  # the object
    assert neighbour_parts(_object_and_neighbour(), box, min_inside=0.1) is None  # about a fifth lies inside


def test_parts_inside_the_box_all_stay_and_the_most_inside_part_always_stays():
    from cutout.workers.boxes import Region, neighbour_parts

    mask = np.zeros((120, 160), np.float32)
    mask[20:60, 20:60] = 1.0
    mask[70:100, 90:120] = 1.0  # a second part, inside the box too (a pair of shoes)
    assert neighbour_parts(mask, Region(10, 10, 130, 110)) is None
    alone = np.zeros((120, 160), np.float32)
    alone[10:110, 100:160] = 1.0  # one part, mostly outside: it is the boxed object all the same
    assert neighbour_parts(alone, Region(10, 10, 130, 110)) is None


def test_the_box_path_leaves_out_a_neighbour_joined_to_the_object(monkeypatch):
    from cutout.workers.boxes import box_region, cut_out_box
    from cutout.workers.pipeline import Pipeline

    rgb = np.full((120, 160, 3), 200, np.uint8)
    monkeypatch.setattr(Pipeline, "segment_raw", lambda self, images: [_object_and_neighbour() for _ in images])
    pipeline = Pipeline(PipelineOptions(model="u2netp", matting="none", refine="none"))
    # the box (10, 10)-(130, 110) with a margin that makes the crop the whole mask
    result = cut_out_box(pipeline, rgb, box_region((10, 10, 120, 100), 160, 120), margin=0.25)
    assert any(note.startswith("box-neighbour") for note in result.notes)
    assert result.alpha[30:90, 30:90].min() > 0.9
    assert result.alpha[:, 118:].max() == 0.0
