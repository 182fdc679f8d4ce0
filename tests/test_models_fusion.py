"""Fused models (``A+B``) and the per-process model cache.

Two fake models registered for the test (known outputs: a horizontal and a vertical ramp) check
the rules, the sizes and the loading; one test runs the real u2netp+modnet fusion on a photo.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from cutout.jobs.cli_options import add_pipeline_arguments, options_from_args
from cutout.jobs.errors import ConfigError
from cutout.jobs.spec import PipelineOptions
from cutout.workers.models import registry
from cutout.workers.models.cache import MODEL_CACHE
from cutout.workers.models.fusion import fuse
from cutout.workers.models.registry import ModelSpec, get_model_spec
from cutout.workers.pipeline import Pipeline
from cutout.workers.segment import get_segmenter


class RampSegmenter:
    """Horizontal (``axis=1``) or vertical (``axis=0``) ramp 0..1: a mask we can predict."""

    def __init__(self, name: str, axis: int, seg_size, device: str):
        self.name, self.axis, self.seg_size, self.device = name, axis, seg_size, device

    def predict(self, images):
        masks = []
        for image in images:
            height, width = image.shape[:2]
            ramp = np.linspace(0.0, 1.0, (height, width)[self.axis], dtype=np.float32)
            masks.append(np.broadcast_to(ramp[:, None] if self.axis == 0 else ramp[None, :], (height, width)).copy())
        return masks


@pytest.fixture()
def ramps(monkeypatch):
    """Register fake models ``ramp-x`` and ``ramp-y``; returns the list of builds made."""
    builds = []

    def register(name: str, axis: int):
        def builder(spec, options, device):
            builds.append((name, options.seg_size, device))
            return RampSegmenter(name, axis, options.seg_size, device)

        spec = ModelSpec(name=name, family="test", description="ramp", builder=builder, input_size=96)
        monkeypatch.setitem(registry._REGISTRY, name, lambda: spec)
        monkeypatch.setitem(registry._SPECS, name, spec)

    register("ramp-x", 1)
    register("ramp-y", 0)
    for fused in ("ramp-x+ramp-y",):
        registry._SPECS.pop(fused, None)
    MODEL_CACHE.clear()
    yield builds
    MODEL_CACHE.clear()
    registry._SPECS.pop("ramp-x+ramp-y", None)


IMAGE = np.zeros((5, 9, 3), np.uint8)
X_RAMP = np.broadcast_to(np.linspace(0, 1, 9, dtype=np.float32)[None, :], (5, 9))
Y_RAMP = np.broadcast_to(np.linspace(0, 1, 5, dtype=np.float32)[:, None], (5, 9))


def test_fuse_rules_on_known_masks():
    a = np.array([[0.0, 0.2], [0.9, 1.0]], np.float32)
    b = np.array([[0.5, 0.1], [0.3, 1.0]], np.float32)
    np.testing.assert_allclose(fuse([a, b], "max"), [[0.5, 0.2], [0.9, 1.0]])
    np.testing.assert_allclose(fuse([a, b], "mean"), [[0.25, 0.15], [0.6, 1.0]])
    with pytest.raises(ConfigError, match="rule"):
        fuse([a, b], "min")


@pytest.mark.parametrize("rule, expected", [(None, np.maximum(X_RAMP, Y_RAMP)), ("max", np.maximum(X_RAMP, Y_RAMP)), ("mean", (X_RAMP + Y_RAMP) / 2)])
def test_fused_model_combines_its_components_by_the_rule(ramps, rule, expected):
    segmenter = get_segmenter(PipelineOptions(model="ramp-x+ramp-y", fusion=rule), device="cpu")
    assert segmenter.rule == (rule or "max")
    np.testing.assert_allclose(segmenter.predict([IMAGE])[0], expected, atol=1e-6)


def test_each_component_is_loaded_once_and_batching_changes_nothing(ramps):
    options = PipelineOptions(model="ramp-x+ramp-y")
    segmenter = get_segmenter(options, device="cpu")
    other = np.zeros((7, 4, 3), np.uint8)
    together = segmenter.predict([IMAGE, other])
    alone = [segmenter.predict([IMAGE])[0], get_segmenter(options, device="cpu").predict([other])[0]]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
    assert sorted(name for name, _, _ in ramps) == ["ramp-x", "ramp-y"]
    assert sorted(MODEL_CACHE.loaded()) == ["ramp-x", "ramp-x+ramp-y", "ramp-y"]


def test_component_sizes_model_sizes_then_seg_size_then_own_default(ramps):
    get_segmenter(PipelineOptions(model="ramp-x+ramp-y", model_sizes="ramp-y=640", seg_size=320), device="cpu")
    assert sorted(ramps) == [("ramp-x", 320, "cpu"), ("ramp-y", 640, "cpu")]
    ramps.clear()
    get_segmenter(PipelineOptions(model="ramp-x+ramp-y", model_sizes={"ramp-x": 128}), device="cpu")
    assert sorted(ramps) == [("ramp-x", 128, "cpu"), ("ramp-y", None, "cpu")]  # None: the model's default


def test_fused_spec_and_pipeline(ramps):
    spec = get_model_spec("ramp-x+ramp-y")
    assert spec.family == "fusion" and spec.components == ("ramp-x", "ramp-y")
    assert (spec.mask_ramp, spec.default_refine, spec.ensemble_sizes) == ((0.0, 1.0), "none", ())
    masks = Pipeline(PipelineOptions(model="ramp-x+ramp-y", fusion="mean"), device="cpu").segment([IMAGE])
    np.testing.assert_allclose(masks[0], (X_RAMP + Y_RAMP) / 2, atol=1e-6)


def test_fused_names_are_checked():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        get_model_spec("isnet-general+nope")
    with pytest.raises(ConfigError, match="two or more different models"):
        get_model_spec("modnet+modnet")


def test_fusion_options_are_validated_and_part_of_the_config_hash():
    with pytest.raises(ValueError, match="needs a fused model"):
        PipelineOptions(model="modnet", fusion="max")
    with pytest.raises(ValueError, match="model_sizes is for a fused model"):
        PipelineOptions(model="modnet", model_sizes="modnet=320")
    with pytest.raises(ValueError, match="not part of model"):
        PipelineOptions(model="isnet-general+modnet", model_sizes="u2netp=320")
    with pytest.raises(ValueError, match="a fused model has several"):
        PipelineOptions(model="isnet-general+modnet", weights="/tmp/x.onnx")
    base = PipelineOptions(model="isnet-general+modnet")
    hashes = {
        base.config_hash(),
        PipelineOptions(model="isnet-general+modnet", fusion="mean").config_hash(),
        PipelineOptions(model="isnet-general+modnet", model_sizes="modnet=640").config_hash(),
    }
    assert len(hashes) == 3
    same = PipelineOptions(model="isnet-general+modnet", model_sizes="modnet=640,isnet-general=1024")
    assert same == PipelineOptions(model="isnet-general+modnet", model_sizes={"isnet-general": 1024, "modnet": 640})


def test_fusion_flags_on_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    args = parser.parse_args(["--model", "isnet-general+modnet", "--fusion", "mean", "--model-sizes", "modnet=640"])
    options = options_from_args(args)
    assert (options.model, options.fusion, options.model_sizes) == ("isnet-general+modnet", "mean", (("modnet", 640),))


# --- the cache ------------------------------------------------------------------------------------
def test_switching_jobs_frees_the_old_models(ramps):
    old = get_segmenter(PipelineOptions(model="ramp-x"), device="cpu")
    old_ref = weakref.ref(old)
    del old
    get_segmenter(PipelineOptions(model="ramp-y"), device="cpu")
    gc.collect()
    assert old_ref() is None
    assert MODEL_CACHE.loaded() == ["ramp-y"]


def test_sizes_and_the_cpu_fallback_of_one_job_stay_loaded_together(ramps):
    options = PipelineOptions(model="ramp-x")
    first = get_segmenter(options.model_copy(update={"seg_size": 768}), device="cpu")
    get_segmenter(options.model_copy(update={"seg_size": 1024}), device="cpu")
    get_segmenter(options.model_copy(update={"seg_size": 512}), device="cuda")  # a simulated device
    assert get_segmenter(options.model_copy(update={"seg_size": 768}), device="cpu") is first
    assert len(ramps) == 3 and len(MODEL_CACHE.loaded()) == 3


# --- the real networks ----------------------------------------------------------------------------
def test_real_fusion_of_u2netp_and_modnet_on_a_photo():
    from cutout.workers.models.fetch import fetch_model
    from tests.test_models_networks import grabcut_photo, iou

    for name in ("u2netp", "modnet"):
        fetch_model(name)
    MODEL_CACHE.clear()
    rgb, truth = grabcut_photo("llama")
    fused = get_segmenter(PipelineOptions(model="u2netp+modnet", fusion="max", seg_size=256), device="cpu")  # small: cheap
    u2netp, modnet = fused.components
    mask = fused.predict([rgb])[0]
    np.testing.assert_allclose(mask, np.maximum(u2netp.predict([rgb])[0], modnet.predict([rgb])[0]), atol=1e-6)
    assert iou(mask, truth) > 0.9
    MODEL_CACHE.clear()


def test_a_fused_mask_says_how_far_its_models_disagree(ramps):
    from cutout.workers.models.fusion import disagreement

    mask = get_segmenter(PipelineOptions(model="ramp-x+ramp-y"), device="cpu").predict([IMAGE])[0]
    x, y = X_RAMP >= 0.5, Y_RAMP >= 0.5
    assert mask.disagreement == pytest.approx(1 - (x & y).sum() / (x | y).sum())
    assert disagreement([X_RAMP, X_RAMP]) == 0.0 and disagreement([X_RAMP * 0, Y_RAMP * 0]) == 0.0


@pytest.mark.parametrize("apart, reruns", [(0.2, True), (1.0, False)])
def test_the_cascade_reruns_where_the_fused_models_disagree(ramps, monkeypatch, apart, reruns):
    """An output that scores well is rerun all the same when its two networks disagreed by more
    than ``escalate_apart`` (the ramps keep different halves of the photo: 1 - IoU = 2/3)."""
    import io

    from PIL import Image

    from cutout.workers.pipeline import PipelineInput

    escalated = []
    monkeypatch.setattr(Pipeline, "_escalate",
                        lambda self, rgb, alpha, first, why, prefer_second: escalated.append((why, prefer_second)) or first)
    options = PipelineOptions(model="ramp-x+ramp-y", fusion="mean", matting="none", refine="none",
                              escalate="fast", escalate_below=0.0, escalate_apart=apart)
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(buffer, format="PNG")
    (outcome,) = Pipeline(options, device="cpu").run([PipelineInput("a.png", buffer.getvalue())])
    assert outcome.ok and bool(escalated) == reruns
    assert escalated in ([], [("models disagree 0.67", True)])


@pytest.mark.parametrize("first_score, prefer_second, kept", [
    (0.65, True, "second"),  # the networks disagreed, the first scores higher by less than the margin
    (0.75, True, "first"),  # by more than the margin
    (0.65, False, "first"),  # the score triggered the rerun: the higher score is kept
    (0.55, False, "second"),
])
def test_the_cascade_keeps_the_rerun_where_the_networks_disagreed(monkeypatch, first_score, prefer_second, kept):
    """Where the trigger was the disagreement, the rerun's output is kept unless the first scores
    more than ``APART_KEEP_MARGIN`` (0.1) higher; otherwise the higher score wins."""
    from cutout.workers.pipeline import APART_KEEP_MARGIN, CutoutResult

    assert APART_KEEP_MARGIN == pytest.approx(0.1)
    rgb = np.full((20, 30, 3), 128, np.uint8)
    alpha = np.ones((20, 30), np.float32)

    def result(score: float) -> CutoutResult:
        return CutoutResult(rgb, alpha, alpha, None, quality={"score": score})

    second = result(0.6)
    monkeypatch.setattr(Pipeline, "segment", lambda self, images: [alpha for _ in images])
    monkeypatch.setattr(Pipeline, "finish", lambda self, rgb, mask, input_alpha=None: second)
    first = result(first_score)
    pipeline = Pipeline(PipelineOptions(model="u2netp", escalate="fast", background="mask"), device="cpu")
    chosen = pipeline._escalate(rgb, None, first, "why", prefer_second=prefer_second)
    assert chosen is (second if kept == "second" else first)
    assert chosen.notes[-1].endswith(f"kept the {kept}")
