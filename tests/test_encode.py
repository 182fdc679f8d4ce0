"""encode_image: every format and channel count round-trips through Pillow."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.errors import ConfigError, EncodeError
from tests import images
from cutout.workers.encode import encode_image


def _arrays():
    rgb = images.gradient_rgb(40, 60)
    alpha = np.tile(np.linspace(0, 255, 60).astype(np.uint8), (40, 1))
    return {"L": rgb[:, :, 0].copy(), "RGB": rgb, "RGBA": np.dstack([rgb, alpha])}


def _decode(data: bytes):
    image = Image.open(io.BytesIO(data))
    return image.format, image.mode, np.asarray(image)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("webp", "WEBP")])
def test_lossless_formats_round_trip_exactly(mode, fmt, pil_format):
    array = _arrays()[mode]
    found_format, found_mode, decoded = _decode(encode_image(array, fmt))
    assert found_format == pil_format
    if fmt == "png":
        assert found_mode == mode
        np.testing.assert_array_equal(decoded, array)
    else:  # WebP stores gray as RGB and may drop the colour of fully transparent pixels
        expected = np.repeat(array[:, :, None], 3, axis=2) if mode == "L" else array
        visible = expected[:, :, 3] > 0 if mode == "RGBA" else np.ones(array.shape[:2], bool)
        np.testing.assert_array_equal(decoded[visible], expected[visible])


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_lossy_webp_is_close_and_follows_quality(mode):
    array = _arrays()[mode]
    high = encode_image(array, "webp-lossy", quality=95)
    low = encode_image(array, "webp-lossy", quality=10)
    assert len(low) < len(high)
    _, found_mode, decoded = _decode(high)
    assert found_mode == mode
    assert np.abs(decoded.astype(int) - array.astype(int)).mean() < 4


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_encodes_gray_and_rgb(mode):
    array = _arrays()[mode]
    found_format, found_mode, decoded = _decode(encode_image(array, "jpeg", quality=92))
    assert found_format == "JPEG" and found_mode == mode
    assert np.abs(decoded.astype(int) - array.astype(int)).mean() < 4


def test_jpeg_refuses_rgba():
    with pytest.raises(EncodeError, match="transparency") as caught:
        encode_image(_arrays()["RGBA"], "jpeg")
    assert caught.value.stage == "encode"


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)],
)
def test_bad_arrays_are_refused(array):
    with pytest.raises(EncodeError):
        encode_image(array, "png")


def test_unknown_format_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown output format"):
        encode_image(_arrays()["RGB"], "gif")


def test_rgb_and_rgba_png_go_through_fpng():
    """The fast writer is the one used when installed (it is a worker dependency)."""
    import fpng
    array = _arrays()["RGBA"]
    assert encode_image(array, "png") == fpng.from_ndarray(np.ascontiguousarray(array))
