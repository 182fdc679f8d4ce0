"""decode_image: every supported kind normalises to uint8 RGB; every bad kind gets its typed error."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFile

from cutout.jobs.errors import (
    ConfigError,
    DecodeError,
    EmptyInputError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from tests import images
from cutout.workers.decode import decode_image


@pytest.mark.parametrize(
    "make, fmt",
    [
        (images.png_rgb_bytes, "PNG"),
        (images.webp_bytes, "WEBP"),
        (images.bmp_bytes, "BMP"),
        (images.tiff_bytes, "TIFF"),
    ],
)
def test_lossless_formats_round_trip_exactly(make, fmt):
    decoded = decode_image(make())
    assert decoded.source_format == fmt
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (48, 64, 3)
    assert decoded.rgb.flags["C_CONTIGUOUS"]
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, images.gradient_rgb())


def test_jpeg_decodes_close_to_source():
    decoded = decode_image(images.jpeg_bytes())
    assert decoded.source_format == "JPEG" and decoded.rgb.shape == (48, 64, 3)
    error = np.abs(decoded.rgb.astype(int) - images.gradient_rgb().astype(int)).mean()
    assert error < 4


def test_exif_orientation_6_rotates_the_pixels():
    decoded = decode_image(images.exif_rotated_jpeg(orientation=6, height=30, width=50))
    assert decoded.exif_transposed is True
    assert decoded.rgb.shape == (50, 30, 3)
    # orientation 6 = display after rotating 90° clockwise
    expected = np.rot90(images.gradient_rgb(30, 50), k=-1).astype(int)
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 4


def test_orientation_1_is_not_transposed():
    decoded = decode_image(images.exif_rotated_jpeg(orientation=1))
    assert decoded.exif_transposed is False and decoded.rgb.shape == (30, 50, 3)


def test_gif_keeps_only_the_first_frame():
    decoded = decode_image(images.gif_two_frames())
    assert decoded.source_format == "GIF" and decoded.rgb.shape == (24, 32, 3)
    assert (decoded.rgb == [255, 0, 0]).all()


def test_cmyk_jpeg_becomes_rgb():
    decoded = decode_image(images.cmyk_jpeg())
    assert decoded.source_mode == "CMYK" and decoded.rgb.shape == (30, 40, 3)
    assert np.abs(decoded.rgb.astype(int) - [0, 255, 255]).max() <= 3


def test_16_bit_gray_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 7 * 9).reshape(7, 9).astype(np.uint16)
    decoded = decode_image(images.png16_gray(values))
    assert decoded.source_mode.startswith("I")
    np.testing.assert_array_equal(decoded.rgb[:, :, 0], np.rint(values / 257.0).astype(np.uint8))
    assert (decoded.rgb[:, :, 0] == decoded.rgb[:, :, 2]).all()


def test_16_bit_rgb_png_is_scaled_not_clipped():
    values = np.random.default_rng(0).integers(0, 65536, (8, 9, 3))
    decoded = decode_image(images.png16_rgb(values))
    assert np.abs(decoded.rgb.astype(int) - values / 257.0).max() <= 1.0
    assert decoded.rgb.min() < 10 and decoded.rgb.max() > 245  # the full range survives


def test_16_bit_rgba_png_keeps_alpha():
    values = np.random.default_rng(1).integers(0, 65536, (8, 9, 4))
    decoded = decode_image(images.png16_rgb(values))
    assert decoded.alpha is not None
    assert np.abs(decoded.alpha.astype(int) - values[:, :, 3] / 257.0).max() <= 1.0


def test_float_tiff_in_unit_range_is_scaled_to_255():
    values = np.linspace(0.0, 1.0, 20).reshape(4, 5)
    decoded = decode_image(images.float_tiff(values))
    np.testing.assert_array_equal(decoded.rgb[:, :, 1], np.rint(values * 255).astype(np.uint8))


def test_palette_png_with_transparency_yields_alpha():
    decoded = decode_image(images.palette_png_with_transparency())
    assert decoded.alpha is not None
    assert (decoded.alpha[:, :10] == 0).all() and (decoded.alpha[:, 10:] == 255).all()
    assert (decoded.rgb[:, 10:] == [0, 255, 0]).all()  # opaque colour untouched
    assert (decoded.rgb[:, :10] == 255).all()  # transparent → white (documented policy)


def test_la_png_yields_gray_rgb_and_alpha():
    decoded = decode_image(images.la_png())
    assert decoded.source_mode == "LA"
    assert (decoded.alpha[:, :10] == 0).all() and (decoded.alpha[:, 10:] == 255).all()
    assert (decoded.rgb[:, 10:] == 200).all() and (decoded.rgb[:, :10] == 255).all()


def test_rgba_half_alpha_is_composited_over_white():
    decoded = decode_image(images.rgba_png(alpha_value=128))
    assert (decoded.alpha == 128).all()
    expected = np.rint(np.array([255, 0, 0]) * 128 / 255 + 255 * (1 - 128 / 255))
    assert (decoded.rgb == expected.astype(np.uint8)).all()


def test_fully_opaque_alpha_is_dropped():
    decoded = decode_image(images.rgba_png(alpha_value=255))
    assert decoded.alpha is None and (decoded.rgb == [255, 0, 0]).all()


@pytest.mark.parametrize(
    "make, error",
    [
        (images.empty_bytes, EmptyInputError),
        (images.text_file, NotAnImageError),
        (images.random_bytes, NotAnImageError),
        (images.truncated_jpeg, TruncatedImageError),
        (images.truncated_png, TruncatedImageError),
        (images.giant_png_header, ImageTooLargeError),
        (images.ico_bytes, UnsupportedImageError),
    ],
)
def test_bad_inputs_raise_typed_errors_naming_the_input(make, error):
    with pytest.raises(error) as caught:
        decode_image(make(), name="sample-123.bin")
    assert "sample-123.bin" in str(caught.value)
    assert caught.value.stage == "decode"


def test_corrupt_pixel_stream_is_a_decode_error():
    with pytest.raises(DecodeError, match="corrupt"):
        decode_image(images.corrupt_png_idat())


def test_max_pixels_is_checked_from_the_header():
    data = images.png_rgb_bytes(48, 64)
    assert decode_image(data, max_pixels=48 * 64).rgb.shape == (48, 64, 3)
    with pytest.raises(ImageTooLargeError, match="3,072 pixels"):
        decode_image(data, max_pixels=48 * 64 - 1)


def test_giant_header_within_pillow_limit_is_refused_before_decoding():
    data = images.giant_png_header(width=9000, height=9000)  # 81 MP, 80-byte file
    with pytest.raises(ImageTooLargeError, match="header"):
        decode_image(data, max_pixels=64_000_000)


def test_truncated_images_are_never_padded(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ConfigError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(images.png_rgb_bytes())
