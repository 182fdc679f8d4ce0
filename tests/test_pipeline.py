"""The whole pipeline as a library: the batch driver ``Pipeline.run`` and its stages."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import cutout

from cutout.jobs.errors import MattingError, OutOfMemoryError
from cutout.jobs.spec import PipelineOptions
from tests import images
from cutout.workers.pipeline import Pipeline, PipelineInput


def disk_on_plain(height: int = 120, width: int = 160) -> np.ndarray:
    """A red disk on a flat grey studio backdrop: the threshold model segments it well."""
    rgb = np.full((height, width, 3), 200, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 3) ** 2
    rgb[inside] = (220, 30, 30)
    return rgb, inside


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


THRESHOLD = PipelineOptions(model="threshold")


def inputs(items: list[tuple[str, bytes]]) -> list[PipelineInput]:
    """(name, encoded bytes) pairs as the driver's inputs."""
    return [PipelineInput(name, data) for name, data in items]


def test_run_isolates_bad_inputs():
    rgb, inside = disk_on_plain()
    items = [
        ("good.png", png(rgb)),
        ("empty.jpg", images.empty_bytes()),
        ("notes.txt", images.text_file()),
        ("cut.jpg", images.truncated_jpeg()),
        ("good2.png", png(rgb[:, ::-1].copy())),
    ]
    outcomes = Pipeline(THRESHOLD).run(inputs(items))
    assert [o.ok for o in outcomes] == [True, False, False, False, True]
    assert [o.error.error_class for o in outcomes[1:4]] == [
        "EmptyInputError", "NotAnImageError", "TruncatedImageError",
    ]
    assert all(o.error.stage == "decode" and o.error.permanent for o in outcomes[1:4])
    rgba = decode(outcomes[0].data)
    assert rgba.shape == (120, 160, 4)
    # the subject is opaque and the backdrop transparent
    assert (rgba[..., 3][inside] > 200).mean() > 0.97
    assert (rgba[..., 3][~inside] < 50).mean() > 0.97
    assert {"decode", "segment", "encode"} <= set(outcomes[0].timings)


@pytest.mark.parametrize(
    "background, fmt, channels",
    [
        ("transparent", "png", 4),
        ("mask", "png", 1),
        ("color:#00ff00", "jpeg", 3),
        ("blur:10", "webp-lossy", 3),
        ("transparent", "webp", 4),
    ],
)
def test_every_background_and_format_decodes(background, fmt, channels):
    rgb, inside = disk_on_plain()
    options = PipelineOptions(model="threshold", background=background, format=fmt)
    (outcome,) = Pipeline(options).run(inputs([("disk", png(rgb))]))
    assert outcome.ok, outcome.error
    out = decode(outcome.data)
    assert (out.shape[2] if out.ndim == 3 else 1) == channels
    assert outcome.extension == options.extension
    if background.startswith("color"):
        corner = out[2, 2].astype(int)
        assert abs(corner[1] - 255) < 20 and corner[0] < 30  # green backdrop replaced the grey


def test_image_background_is_read_through_the_reader():
    rgb, inside = disk_on_plain()
    backdrop = np.zeros((40, 40, 3), np.uint8)
    backdrop[..., 2] = 255
    reads = []

    def reader(uri: str) -> bytes:
        reads.append(uri)
        return png(backdrop)

    options = PipelineOptions(model="threshold", background="image:s3://b/blue.png")
    pipeline = Pipeline(options, read_uri=reader)
    outcomes = pipeline.run(inputs([("a", png(rgb)), ("b", png(rgb))]))
    assert all(o.ok for o in outcomes)
    assert reads == ["s3://b/blue.png"]  # loaded once per pipeline, not per image
    out = decode(outcomes[0].data)
    assert tuple(out[2, 2]) == (0, 0, 255)


def test_input_alpha_is_kept():
    rgb, inside = disk_on_plain()
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, : rgb.shape[1] // 2, 3] = 0  # left half already transparent
    (outcome,) = Pipeline(THRESHOLD).run(inputs([("half", png(rgba))]))
    out = decode(outcome.data)
    assert (out[:, : rgb.shape[1] // 2, 3] == 0).all()
    assert "input-alpha-applied" in outcome.notes


def test_matting_failure_falls_back_to_the_mask_with_a_note(monkeypatch):
    def broken(*args, **kwargs):
        raise MattingError("solver diverged")

    monkeypatch.setattr("cutout.workers.matte.estimate_alpha", broken)
    rgb, _ = disk_on_plain()
    (outcome,) = Pipeline(THRESHOLD).run(inputs([("disk", png(rgb))]))
    assert outcome.ok
    assert any(note.startswith("matting-fallback") for note in outcome.notes)


def test_matting_is_skipped_when_the_mask_is_unsure_everywhere():
    rgb, _ = disk_on_plain()
    unsure = np.full(rgb.shape[:2], 0.5, np.float32)
    unsure[:5] = 0.0
    unsure[-5:] = 1.0
    result = Pipeline(THRESHOLD).finish(rgb, unsure)
    assert any(note.startswith("matting-skipped") for note in result.notes)
    np.testing.assert_allclose(result.alpha, unsure)


def test_user_trimap_is_solved_even_when_wide():
    rgb, inside = disk_on_plain()
    trimap = np.full(rgb.shape[:2], 128, np.uint8)
    trimap[:10] = 0
    trimap[60, 80] = 255
    trimap[55:65, 75:85] = 255
    result = Pipeline(THRESHOLD).finish(rgb, inside.astype(np.float32), trimap=trimap)
    assert not any(note.startswith("matting-skipped") for note in result.notes)
    assert result.alpha[inside].mean() > 0.9 and result.alpha[~inside].mean() < 0.1


class _FlakyDevice:
    """A segmenter stand-in that runs out of memory for batches and for large inputs."""

    name, device = "flaky", "cuda"

    def __init__(self, options):
        self.options = options

    def predict(self, images_):
        if len(images_) > 1 or (self.options.seg_size or 1024) > 512:
            raise OutOfMemoryError("CUDA out of memory (simulated)")
        return [np.ones(image.shape[:2], np.float32) for image in images_]


def test_out_of_memory_retries_one_by_one_at_a_smaller_size(monkeypatch):
    calls = []

    def fake_get_segmenter(options, device=None):
        calls.append((options.seg_size, device))
        return _FlakyDevice(options)

    monkeypatch.setattr("cutout.workers.segment.get_segmenter", fake_get_segmenter)
    rgb, _ = disk_on_plain()
    masks = Pipeline(PipelineOptions(model="threshold", seg_size=1024)).segment_raw([rgb, rgb])
    assert len(masks) == 2 and all(m.shape == rgb.shape[:2] for m in masks)
    assert (512, None) in calls  # retried at half size


def test_remove_background_with_a_user_trimap():
    rgb, inside = disk_on_plain()
    trimap = np.where(inside, 255, 0).astype(np.uint8)
    trimap[:, 70:90] = 128  # a vertical unknown strip through the disk and the backdrop
    result = cutout.remove_background(rgb, model="threshold", trimap=trimap)
    strip = (slice(None), slice(70, 90))
    assert result.trimap is not None and (result.trimap[strip] == 128).all()
    assert result.alpha[strip][inside[strip]].mean() > 0.9
    assert result.alpha[strip][~inside[strip]].mean() < 0.1


def test_decode_notes_and_quality_reach_the_outcome_and_the_api():
    rgb, _ = disk_on_plain()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", icc_profile=b"not a profile" * 20)
    (outcome,) = Pipeline(THRESHOLD).run(inputs([("tagged.png", buffer.getvalue())]))
    assert outcome.ok and "icc-profile-ignored: unreadable profile" in outcome.notes
    assert 0.2 < outcome.quality["alpha_coverage"] < 0.4 and outcome.flags == []
    result = cutout.remove_background(buffer.getvalue(), model="threshold")
    assert "icc-profile-ignored: unreadable profile" in result.notes
    assert result.quality == outcome.quality and {"decode", "segment", "composite"} <= set(result.timings)


def test_a_hand_trimap_replaces_segmentation(monkeypatch):
    """Only the input without a hand trimap goes through the model; the other says why not."""
    rgb, inside = disk_on_plain()
    trimap = np.where(inside, 255, 0).astype(np.uint8)
    trimap[:, 70:90] = 128
    on_model: list[int] = []
    real_segment = Pipeline.segment_raw

    def counting(self, images_):
        on_model.append(len(images_))
        return real_segment(self, images_)

    monkeypatch.setattr(Pipeline, "segment_raw", counting)
    guided, auto = Pipeline(THRESHOLD).run(
        [PipelineInput("guided", png(rgb), trimap=png(trimap)), PipelineInput("auto", png(rgb))])
    assert on_model == [1]
    assert guided.ok and "hand-trimap: segmentation skipped" in guided.notes
    assert "segment" not in guided.timings and "segment" in auto.timings
    assert not any(note.startswith("hand-trimap") for note in auto.notes)
    alpha = decode(guided.data)[..., 3]
    assert (alpha[:, :70][~inside[:, :70]] == 0).all() and (alpha[:, :70][inside[:, :70]] == 255).all()
    Pipeline(THRESHOLD).run([PipelineInput("guided", rgb=rgb, trimap=trimap)])
    assert on_model == [1]  # an array trimap (the Python API's) skips the model too
