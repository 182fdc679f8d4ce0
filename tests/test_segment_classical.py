"""The weight-free segmenters on synthetic photos-with-a-backdrop: IoU with the known shape."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cutout.jobs.errors import ConfigError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.segment import Segmenter, get_segmenter


def _disk_scene(seed: int, background=(235, 238, 240), subject=(180, 40, 60), height=240, width=320):
    """A shaded disk on a slightly noisy, slightly graded studio backdrop, plus its true mask."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = background
    image += np.linspace(-6, 6, width, dtype=np.float32)[None, :, None]  # uneven lighting
    truth = np.zeros((height, width), dtype=np.uint8)
    cv2.circle(truth, (width // 2 + 10, height // 2), min(height, width) // 3, 1, -1)
    shading = np.linspace(0.8, 1.15, height, dtype=np.float32)[:, None, None]
    image = np.where(truth[..., None] == 1, np.asarray(subject, np.float32) * shading, image)
    image += rng.normal(0, 3, image.shape)
    image = cv2.GaussianBlur(image, (3, 3), 0)  # soft edges like a real lens
    return np.clip(image, 0, 255).astype(np.uint8), truth.astype(bool)


def _iou(mask: np.ndarray, truth: np.ndarray) -> float:
    hard = mask > 0.5
    return (hard & truth).sum() / (hard | truth).sum()


@pytest.mark.parametrize("model", ["threshold", "grabcut"])
def test_classical_segmenters_find_a_disk_on_a_plain_backdrop(model):
    scenes = [_disk_scene(0), _disk_scene(1, background=(30, 30, 35), subject=(230, 200, 80))]
    segmenter = get_segmenter(PipelineOptions(model=model), device="cpu")
    assert isinstance(segmenter, Segmenter)
    masks = segmenter.predict([image for image, _ in scenes])
    for mask, (image, truth) in zip(masks, scenes):
        assert mask.shape == truth.shape and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        assert _iou(mask, truth) > 0.9


def test_threshold_removes_specks_and_fills_small_holes():
    image, truth = _disk_scene(2)
    image[20:23, 20:23] = (0, 0, 0)  # dust on the backdrop
    cy, cx = np.argwhere(truth).mean(axis=0).astype(int)
    image[cy - 2 : cy + 2, cx - 2 : cx + 2] = (235, 238, 240)  # a backdrop-coloured glint inside the subject
    mask = get_segmenter(PipelineOptions(model="threshold"), device="cpu").predict([image])[0]
    assert mask[21, 21] == 0.0
    assert mask[cy, cx] > 0.5


def test_threshold_soft_edge_is_between_zero_and_one():
    image, truth = _disk_scene(3)
    mask = get_segmenter(PipelineOptions(model="threshold"), device="cpu").predict([image])[0]
    edge = cv2.morphologyEx(truth.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    assert ((mask[edge] > 0.02) & (mask[edge] < 0.98)).any()


def test_classical_models_refuse_weights():
    with pytest.raises(ConfigError, match="takes no weights"):
        get_segmenter(PipelineOptions(model="threshold", weights="/tmp/x.pth"), device="cpu")
