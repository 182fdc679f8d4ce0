"""Class selection (``select_by``): a class model's mask picks among the salient mask's objects.

The rule on synthetic masks, then the pipeline end to end with the registered class models on
RANDOM-INIT weights (placed in a models folder under their registered file names, the specs'
digests pointed at them) and the ``threshold`` salient model, and the options through the CLI.
"""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cutout.jobs.spec import PipelineOptions
from cutout.workers.models import registry
from cutout.workers.models.cache import MODEL_CACHE
from cutout.workers.models.maskrcnn import build_maskrcnn_module
from cutout.workers.models.torchvision_semantic import build_torchvision_module
from cutout.workers.pipeline import Pipeline, PipelineInput
from cutout.workers.select import MIN_SHARE, select_by_class

REPO = Path(__file__).resolve().parents[1]
SEMANTIC = ("deeplabv3-mobilenet-v3", "lraspp-mobilenet-v3")


def soft_disc(shape, centre, radius, edge) -> np.ndarray:
    """A disc whose edge ramps from 1 to 0 over ``edge`` px (a salient mask's soft edge)."""
    rows, cols = np.indices(shape)
    distance = np.hypot(rows - centre[0], cols - centre[1])
    return np.clip((radius + edge / 2 - distance) / edge, 0.0, 1.0).astype(np.float32)


def two_blobs(scale: int = 1):
    shape = (120 * scale, 200 * scale)
    left = soft_disc(shape, (60 * scale, 50 * scale), 30 * scale, 4 * scale)
    right = soft_disc(shape, (60 * scale, 150 * scale), 30 * scale, 4 * scale)
    return left, right, np.maximum(left, right)


@pytest.mark.parametrize("scale", [1, 8])  # 8: above WORK_SIDE, found on a small copy
def test_the_object_under_the_class_mask_is_kept_with_its_soft_edge(scale):
    left, right, mask = two_blobs(scale)
    class_mask = np.zeros((60, 100), np.float32)  # the class model's own (smaller) size
    class_mask[20:45, 60:90] = 0.9  # a coarse patch over the right blob only
    selected, note = select_by_class(mask, class_mask)
    assert note == "kept 1 of 2 object(s)"
    assert np.array_equal(selected, right)  # soft values and the whole soft edge kept as they were
    assert ((right > 0) & (right < 1)).sum() > 100 * scale
    assert selected[left > 0].max() == 0.0


def test_an_object_mostly_outside_the_class_mask_is_dropped():
    _, right, mask = two_blobs()
    class_mask = np.zeros(mask.shape, np.float32)
    class_mask[30:90, 20:50] = 1.0  # half of the left blob: below MIN_SHARE? it is 0.5 of it
    class_mask[:, 120:200] = 1.0  # all of the right one
    selected, note = select_by_class(mask, class_mask, min_share=0.6)
    assert note == "kept 1 of 2 object(s)" and np.array_equal(selected, right)


def test_when_none_qualifies_the_one_with_most_class_pixels_is_kept():
    left, _, mask = two_blobs()
    class_mask = np.zeros(mask.shape, np.float32)
    class_mask[50:70, 30:60] = 1.0  # a small part of the left blob
    class_mask[55:60, 140:145] = 1.0  # a smaller part of the right one
    selected, note = select_by_class(mask, class_mask)
    assert note.startswith(f"kept 1 of 2 object(s): none lies {MIN_SHARE:.0%} in the class mask")
    assert np.array_equal(selected, left)


def test_when_no_object_touches_the_class_mask_nothing_is_kept():
    _, _, mask = two_blobs()
    class_mask = np.zeros(mask.shape, np.float32)
    class_mask[:10, :10] = 1.0
    selected, note = select_by_class(mask, class_mask)
    assert note == "kept 0 of 2 object(s): none touches the class mask" and not selected.any()


@pytest.fixture(scope="module")
def class_models(tmp_path_factory):
    """Random-init weights of the registered class models in a models folder, each spec's
    digest pointed at its file (so the real loading path, checksum included, runs)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    patch = pytest.MonkeyPatch()
    patch.setenv("CUTOUT_MODELS_DIR", str(folder))
    modules = {name: build_torchvision_module(name) for name in SEMANTIC}
    modules["maskrcnn"] = build_maskrcnn_module()
    for name, module in modules.items():
        spec = registry.get_model_spec(name)
        path = folder / spec.weights.filename
        torch.save(module.state_dict(), path)
        weights = dataclasses.replace(spec.weights, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), md5=None)
        patch.setitem(registry._SPECS, name, dataclasses.replace(spec, weights=weights))
    MODEL_CACHE.clear()
    yield folder
    MODEL_CACHE.clear()
    patch.undo()


def photo() -> np.ndarray:
    """Two dark objects on a light ground: ``threshold`` finds two components."""
    rgb = np.full((96, 128, 3), 235, np.uint8)
    rgb[20:70, 10:50] = (30, 40, 160)
    rgb[30:80, 75:115] = (150, 30, 30)
    return rgb


def run(options: PipelineOptions):
    pipeline = Pipeline(options, device="cpu")
    pipeline.load_models()
    if options.select_by == "maskrcnn":  # random weights keep ~1000 proposals: cap them (speed)
        segmenter = pipeline._class_segmenter()
        segmenter.module.rpn._post_nms_top_n["testing"] = 50
        segmenter.module.roi_heads.detections_per_img = 10
    (outcome,) = pipeline.run([PipelineInput("photo", rgb=photo())], encode=False, keep_result=True)
    assert outcome.ok, outcome.error
    return outcome


@pytest.mark.parametrize("class_model", [*SEMANTIC, "maskrcnn"])
def test_the_pipeline_selects_with_each_registered_class_model(class_models, class_model):
    plain = run(PipelineOptions(model="threshold", matting="none", refine="none", objects="all"))
    chosen = run(PipelineOptions(model="threshold", matting="none", refine="none", select_by=class_model))
    (note,) = [n for n in chosen.notes if n.startswith("select-by")]
    assert note.startswith(f"select-by {class_model} (its default classes): kept ")
    assert "select" in chosen.timings and "select" not in plain.timings
    kept = int(note.split("kept ")[1].split(" of ")[0])
    if kept == 2:  # everything the salient mask had, untouched
        assert np.array_equal(chosen.result.alpha, plain.result.alpha)
    elif kept == 0:
        assert not chosen.result.alpha.any()
    else:
        assert 0 < chosen.result.alpha.sum() < plain.result.alpha.sum()


def test_the_classes_decide_what_is_kept(class_models):
    """Random LR-ASPP: background has 1 chance in 21, so "all 20 classes" claims every pixel
    and one class claims none; the same salient mask is kept whole, or emptied."""
    base = {"model": "threshold", "matting": "none", "refine": "none", "select_by": "lraspp-mobilenet-v3"}
    every = run(PipelineOptions(**base))
    person = run(PipelineOptions(**base, classes="person"))
    assert any(n.endswith("(its default classes): kept 2 of 2 object(s)") for n in every.notes)
    assert any(n.endswith("(person): kept 0 of 2 object(s): none touches the class mask") for n in person.notes)
    assert every.result.alpha.sum() > 1000 and not person.result.alpha.any()
    assert "empty_alpha" in person.flags


def test_a_failing_selection_is_named_and_spares_its_neighbours(class_models, monkeypatch):
    import cutout.workers.select as select

    real = select.select_by_class
    monkeypatch.setattr(select, "select_by_class", lambda mask, *a, **k: (
        (_ for _ in ()).throw(RuntimeError("injected")) if mask.shape == (50, 70) else real(mask, *a, **k)))
    pipeline = Pipeline(PipelineOptions(model="threshold", matting="none", select_by="lraspp-mobilenet-v3"),
                        device="cpu")
    outcomes = pipeline.run([PipelineInput("a", rgb=photo()), PipelineInput("bad", rgb=photo()[:50, :70])],
                            encode=False)
    assert outcomes[0].ok and not outcomes[1].ok and outcomes[1].error.stage == "select"


def test_select_by_is_an_option_of_the_config_hash_and_validated():
    plain = PipelineOptions(model="threshold")
    chosen = PipelineOptions(model="threshold", select_by="maskrcnn", classes="cup")
    assert chosen.config_hash() != plain.config_hash()
    assert chosen.config_hash() != PipelineOptions(model="threshold", select_by="maskrcnn").config_hash()
    assert chosen.classes == ("cup",)
    with pytest.raises(ValueError, match="not a class model; use one of: deeplabv3-mobilenet-v3"):
        PipelineOptions(select_by="isnet-general")
    with pytest.raises(ValueError, match="takes classes itself"):
        PipelineOptions(model="maskrcnn", select_by="lraspp-mobilenet-v3")
    with pytest.raises(ValueError, match="has no class 'unicorn'"):
        PipelineOptions(model="threshold", select_by="lraspp-mobilenet-v3", classes="unicorn")


@pytest.mark.parametrize("flags, message", [
    (["--select-by", "deeplab"], "select_by 'deeplab' is not a class model; use one of:"),
    (["--select-by", "maskrcnn", "--classes", "unicorn"], "has no class 'unicorn'"),
])
def test_a_bad_select_by_is_a_one_line_error_through_the_cli(tmp_path, flags, message):
    from PIL import Image

    Image.fromarray(photo()).save(tmp_path / "a.png")
    proc = subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "run", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"),
         "--model", "threshold", "--no-progress", *flags], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out" / "_cutout_run.jsonl").exists()


def test_the_cascade_second_run_selects_too(class_models, monkeypatch):
    """An escalated output is cut out by the costlier preset with the same class model."""
    import cutout.workers.select as select
    from cutout.workers.models.registry import get_model_spec

    for name in ("isnet-general", "u2netp"):  # the fast preset's models, beside the class models
        source = Path.home() / ".cache" / "cutout" / "models" / get_model_spec(name).weights.filename
        target = class_models / source.name
        if not target.exists():
            target.symlink_to(source)
    calls = []
    real = select.select_by_class
    monkeypatch.setattr(select, "select_by_class", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    outcome = run(PipelineOptions(model="threshold", matting="none", select_by="lraspp-mobilenet-v3",
                                  classes="person", escalate="fast", escalate_below=1.0))
    assert any(note.startswith("escalated to fast") for note in outcome.notes), outcome.notes
    assert calls == [(96, 128), (96, 128)]  # the first run and the escalated one
    assert not outcome.result.alpha.any()  # random LR-ASPP: no person in either run
