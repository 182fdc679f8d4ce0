"""The stage driver: a failure in any stage is recorded under that stage's name, and its
neighbours in the batch still succeed (issue 8, defect 16)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.errors import ConfigError, CutoutError
from cutout.jobs.spec import PipelineOptions
import cutout
from cutout.workers.pipeline import Pipeline, PipelineInput
from cutout.workers.stages import STAGES, run_stage

BAD_SHAPE = (37, 53)  # the one input whose stage fails: told apart by its size


def photo(height: int, width: int) -> np.ndarray:
    rgb = np.full((height, width, 3), 200, np.uint8)
    rgb[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = (220, 30, 30)
    return rgb


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _is_bad(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.shape[:2] == BAD_SHAPE
    if isinstance(value, (list, tuple)):
        return any(_is_bad(v) for v in value)
    return False


def failing_for_bad_input(real):
    """``real``, except that it raises a plain RuntimeError on the bad input."""
    def wrapper(*args, **kwargs):
        if any(_is_bad(a) for a in args) or kwargs.get("name") == "bad.png":
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return wrapper


# Where each stage's work is done: (module, attribute) or (Pipeline, method name).
STAGE_FUNCTIONS = {
    "decode": ("cutout.workers.decode", "decode_image"),
    "segment": (Pipeline, "segment_raw"),
    "calibrate": (Pipeline, "calibrate"),
    "refine": ("cutout.workers.refine", "refine_with_grabcut"),
    "trimap": ("cutout.workers.trimap", "make_trimap"),
    "matte": ("cutout.workers.matte", "estimate_alpha"),
    "objects": ("cutout.workers.objects", "keep_main_object"),
    "foreground": ("cutout.workers.foreground", "estimate_foreground"),
    "composite": ("cutout.workers.composite", "composite"),
    "encode": ("cutout.workers.encode", "encode_image"),
}


def _inject(monkeypatch, stage: str) -> None:
    owner, name = STAGE_FUNCTIONS[stage]
    if isinstance(owner, str):
        owner = __import__(owner, fromlist=[name])
    monkeypatch.setattr(owner, name, failing_for_bad_input(getattr(owner, name)))


def test_every_stage_has_an_injection_point():
    # "box" runs only for inputs with a box hint: tests/test_boxes.py injects it there;
    # "select" only with select_by: tests/test_select.py does
    assert set(STAGE_FUNCTIONS) | {"box", "select"} == set(STAGES)


@pytest.mark.parametrize("stage", [stage for stage in STAGES if stage not in ("box", "select")])
def test_a_failing_stage_is_named_and_spares_its_neighbours(monkeypatch, stage):
    _inject(monkeypatch, stage)
    options = PipelineOptions(model="threshold", refine="grabcut", matting="closed-form",
                              mask_ramp=(0.1, 0.9))
    items = [("a.png", png(photo(48, 64))), ("bad.png", png(photo(*BAD_SHAPE))),
             ("c.png", png(photo(40, 60)))]
    outcomes = Pipeline(options).run([PipelineInput(name, data) for name, data in items])
    assert [o.ok for o in outcomes] == [True, False, True]
    error = outcomes[1].error
    assert error.stage == stage, f"injected into {stage}, recorded as {error.stage}"
    assert "injected failure" in str(error) and isinstance(error.__cause__, RuntimeError)
    assert set(outcomes[0].timings) <= set(STAGES)
    assert {"decode", "segment", "calibrate", "encode"} <= set(outcomes[0].timings)


@pytest.mark.parametrize("stage", ["calibrate", "foreground", "composite"])
def test_library_callers_get_the_stage_too(monkeypatch, stage):
    _inject(monkeypatch, stage)
    with pytest.raises(CutoutError) as caught:
        cutout.remove_background(photo(*BAD_SHAPE), model="threshold")
    assert caught.value.stage == stage
    good, bad = Pipeline(PipelineOptions(model="threshold")).run(
        [PipelineInput("good", rgb=photo(48, 64)), PipelineInput("bad", rgb=photo(*BAD_SHAPE))],
        encode=False, keep_result=True)
    assert bad.error.stage == stage and bad.result is None
    assert good.ok and good.data is None and good.result.alpha.shape == (48, 64)
    assert good.result.raw_mask.shape == (48, 64) and "segment" in good.result.timings


def test_a_typed_error_keeps_its_class_and_gets_the_stage_it_happened_in():
    """An unreadable ``image:`` background is a ConfigError raised while compositing."""
    options = PipelineOptions(model="threshold", background="image:file:///nonexistent/bg.png")

    def unreadable(uri):
        raise ConfigError(f"cannot read background {uri}")

    (outcome,) = Pipeline(options, read_uri=unreadable).run([PipelineInput("a.png", png(photo(48, 64)))])
    assert outcome.error.error_class == "ConfigError" and outcome.error.stage == "composite"


def test_run_stage_times_and_refuses_unknown_names():
    timings: dict[str, float] = {}
    assert run_stage(timings, "encode", lambda x: x + 1, 1) == 2
    with pytest.raises(CutoutError):
        run_stage(timings, "encode", lambda: 1 / 0)
    assert set(timings) == {"encode"} and timings["encode"] >= 0
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage(timings, "polish", lambda: None)
