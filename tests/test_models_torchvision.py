"""torchvision models with RANDOM-INIT weights saved locally and loaded through options.weights:
the real loading code, shapes, ranges and class selection; no download."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cutout.jobs.errors import ConfigError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models.maskrcnn import COCO_CATEGORIES, build_maskrcnn_module, collapse_instances
from cutout.workers.models.torchvision_semantic import VOC_CATEGORIES, build_torchvision_module
from cutout.workers.segment import clear_segmenter_cache, get_segmenter

SEMANTIC = ["deeplabv3-mobilenet-v3", "lraspp-mobilenet-v3"]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """name → path of a random-init state_dict, saved the way torchvision checkpoints are."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for name in SEMANTIC:
        module = build_torchvision_module(name)
        paths[name] = folder / f"{name}.pth"
        torch.save(module.state_dict(), paths[name])
    paths["maskrcnn"] = folder / "maskrcnn.pth"
    torch.save(build_maskrcnn_module().state_dict(), paths["maskrcnn"])
    clear_segmenter_cache()
    yield paths
    clear_segmenter_cache()


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), rng.integers(0, 256, (75, 50, 3), dtype=np.uint8)]


@pytest.mark.parametrize("name", SEMANTIC)
def test_semantic_model_masks_have_original_sizes_and_probabilities(random_weights, name):
    options = PipelineOptions(model=name, weights=str(random_weights[name]), seg_size=96)
    images = _images()
    masks = get_segmenter(options, device="cpu").predict(images)
    assert [m.shape for m in masks] == [i.shape[:2] for i in images]
    assert all(m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0 for m in masks)


@pytest.mark.parametrize("name", SEMANTIC)
def test_semantic_class_selection_sums_class_probabilities(random_weights, name):
    def masks(classes):
        options = PipelineOptions(model=name, weights=str(random_weights[name]), seg_size=96, classes=classes)
        return get_segmenter(options, device="cpu").predict(_images())

    person, cat, both, everything = masks("person"), masks("cat"), masks("person,cat"), masks(())
    for p, c, b, e in zip(person, cat, both, everything):
        assert np.allclose(p + c, b, atol=1e-4)  # disjoint classes add up
        assert (e >= b - 1e-4).all()  # all 20 classes cover any subset
        assert not np.allclose(p, c, atol=1e-3)  # classes really select different channels


def test_semantic_unknown_class_lists_valid_names(random_weights):
    options = PipelineOptions(model="lraspp-mobilenet-v3", weights=str(random_weights["lraspp-mobilenet-v3"]), classes="unicorn")
    with pytest.raises(ConfigError) as info:
        get_segmenter(options, device="cpu")
    assert "'unicorn'" in str(info.value) and "person" in str(info.value) and "__background__" not in str(info.value)
    assert len(VOC_CATEGORIES) == 21


def test_maskrcnn_loads_random_weights_and_returns_full_size_masks(random_weights):
    options = PipelineOptions(model="maskrcnn", weights=str(random_weights["maskrcnn"]), seg_size=128, score_threshold=0.0)
    segmenter = get_segmenter(options, device="cpu")
    assert segmenter.input_size == 128 and segmenter.labels == [COCO_CATEGORIES.index("person")]  # default class
    # random weights keep ~1000 proposals and 100 detections per image: cap them to keep the test fast
    segmenter.module.rpn._post_nms_top_n["testing"] = 50
    segmenter.module.roi_heads.detections_per_img = 10
    images = _images()
    masks = segmenter.predict(images)
    assert [m.shape for m in masks] == [i.shape[:2] for i in images]
    assert all(m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0 for m in masks)


def test_maskrcnn_class_names_are_validated(random_weights):
    options = PipelineOptions(model="maskrcnn", weights=str(random_weights["maskrcnn"]), classes="N/A")
    with pytest.raises(ConfigError, match="valid classes"):
        get_segmenter(options, device="cpu")


def test_collapse_keeps_wanted_classes_above_threshold_by_max():
    masks = np.zeros((3, 4, 4), dtype=np.float32)
    masks[0, 0, 0], masks[1, 0, 0], masks[2, 3, 3] = 0.6, 0.9, 0.8
    masks[0, 1, 1] = 0.7
    labels = np.array([1, 1, 18])  # person, person, dog
    scores = np.array([0.9, 0.3, 0.95])
    person = collapse_instances(masks, labels, scores, [1], 0.5, (4, 4))
    assert person[0, 0] == pytest.approx(0.6) and person[1, 1] == pytest.approx(0.7) and person[3, 3] == 0
    both = collapse_instances(masks, labels, scores, [1, 18], 0.2, (4, 4))
    assert both[0, 0] == pytest.approx(0.9) and both[3, 3] == pytest.approx(0.8)
    assert not collapse_instances(masks, labels, scores, [3], 0.0, (4, 4)).any()
