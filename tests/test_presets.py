"""Presets resolve into PipelineOptions fields; explicit settings win; the preset is hashed."""
import argparse

import pytest

from cutout.jobs.cli_options import add_pipeline_arguments, options_from_args
from cutout.jobs.errors import ConfigError
from cutout.jobs.presets import PRESETS
from cutout.jobs.spec import JobSpec, PipelineOptions
from cutout.workers.pipeline import Pipeline


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    return options_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_fills_its_table_values(name):
    options = PipelineOptions(preset=name)
    table = PRESETS[name]
    assert options.model == table["model"]
    for key, value in {**table["common"], **table["model_settings"]}.items():
        assert getattr(options, key) == value, key
    assert Pipeline(options).seg_sizes == table["model_settings"].get("seg_sizes", (None,))


def test_default_is_balanced_and_cli_default_matches_the_api():
    assert PipelineOptions().preset == "balanced"
    assert _parse() == PipelineOptions()


def test_explicit_flags_override_the_preset():
    options = _parse("--preset", "best", "--refine", "none", "--matting", "none", "--trimap-band", "0.02")
    assert (options.refine, options.matting, options.trimap_band) == ("none", "none", 0.02)
    assert options.seg_sizes == PRESETS["best"]["model_settings"]["seg_sizes"]
    assert Pipeline(_parse("--preset", "best", "--seg-size", "512")).seg_sizes == (512,)


def test_another_model_keeps_its_own_measured_defaults():
    options = PipelineOptions(preset="fast", model="threshold")
    assert options.seg_sizes is None and options.mask_ramp is None and options.refine == "auto"


def test_preset_is_part_of_the_hash_and_round_trips():
    fast, best = PipelineOptions(preset="fast"), PipelineOptions(preset="best")
    assert fast.config_hash() != best.config_hash()
    assert PipelineOptions(**fast.model_dump()) == fast
    spec = JobSpec(sources=("s3://a/",), destination="s3://b/", pipeline=fast)
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec


def test_unknown_preset_and_bad_sizes_are_refused():
    with pytest.raises((ConfigError, ValueError)):
        PipelineOptions(preset="turbo")
    with pytest.raises((ConfigError, ValueError)):
        PipelineOptions(seg_sizes=(32,))


def test_keyword_model_override_does_not_inherit_the_presets_isnet_settings():
    """remove_background(model=...) resolves the preset around the override: the threshold
    model must not get IS-Net's calibration ramp or sizes from the default preset."""
    import numpy as np

    from cutout import remove_background

    rgb = np.full((40, 60, 3), 200, np.uint8)
    rgb[10:30, 20:40] = (20, 40, 180)
    result = remove_background(rgb, model="threshold", matting="none", refine="none")
    plain = Pipeline(PipelineOptions(model="threshold", matting="none", refine="none"))
    np.testing.assert_array_equal(result.mask, plain.segment([rgb])[0])
    assert plain.mask_ramp == (0.0, 1.0)


@pytest.mark.parametrize("rule, expected", [("mean", 0.5), ("max", 0.8)])
def test_size_rule_combines_the_passes(monkeypatch, rule, expected):
    """Passes at several sizes are averaged ("mean") or the surest pass wins per pixel ("max")."""
    import numpy as np

    per_size = {512: 0.2, 768: 0.8}
    options = PipelineOptions(model="isnet-general", seg_sizes=(512, 768), size_rule=rule, mask_ramp=(0.0, 1.0))
    pipeline = Pipeline(options)
    monkeypatch.setattr(pipeline, "segment_at",
                        lambda images, size: [np.full(image.shape[:2], per_size[size], np.float32) for image in images])
    mask = pipeline.segment([np.zeros((4, 6, 3), np.uint8)])[0]
    assert mask.shape == (4, 6) and np.allclose(mask, expected)


def test_size_rule_is_checked_and_hashed():
    with pytest.raises((ConfigError, ValueError)):
        PipelineOptions(size_rule="median")
    assert PipelineOptions(size_rule="max").config_hash() != PipelineOptions(size_rule="mean").config_hash()
