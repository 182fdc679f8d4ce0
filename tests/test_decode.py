"""decode_image: every supported kind normalises to uint8 RGB; every bad kind gets its typed error."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ImageFile

from cutout.jobs.errors import (
    ConfigError,
    CorruptImageError,
    DecodeError,
    EmptyInputError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from tests import images
from tests.icc import adobe_rgb_profile, adobe_to_srgb_reference
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


# --- float images: the range comes from finite values (issue 8, defect 9) ------------------------
def test_one_inf_pixel_does_not_blacken_a_float_image():
    values = np.linspace(0.0, 1.0, 20).reshape(4, 5)
    values[0, 0] = np.inf
    gray = decode_image(images.float_tiff(values)).rgb[:, :, 0]
    expected = np.rint(values * 255).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(gray.ravel()[1:], expected.ravel()[1:])
    assert gray[0, 0] == 255  # +Inf is the brightest value, not the scale


def test_nan_and_negative_inf_are_black_and_one_huge_outlier_cannot_set_the_scale():
    values = np.tile(np.linspace(0.0, 1.0, 50), (40, 1))
    values[0, :3] = [np.nan, -np.inf, 1e30]
    gray = decode_image(images.float_tiff(values)).rgb[:, :, 0].astype(int)
    assert gray[0, 0] == 0 and gray[0, 1] == 0 and gray[0, 2] == 255
    assert np.abs(gray[1:] - np.rint(values[1:] * 255)).max() <= 1


def test_all_nan_float_image_is_a_typed_error():
    with pytest.raises(CorruptImageError, match="no finite pixel value") as caught:
        decode_image(images.float_tiff(np.full((4, 5), np.nan)), name="nan.tif")
    assert "nan.tif" in str(caught.value) and caught.value.stage == "decode"


@pytest.mark.parametrize("channels", [3, 4])
def test_float_rgb_tiff_decodes(channels):
    import cv2
    rng = np.random.default_rng(4)
    rgb = rng.random((20, 30, 3)).astype(np.float32)
    pixels = rgb if channels == 3 else np.dstack([rgb, np.full((20, 30), 0.5, np.float32)])
    order = [2, 1, 0, 3][:channels]  # OpenCV writes BGR(A)
    ok, data = cv2.imencode(".tiff", np.ascontiguousarray(pixels[:, :, order]))
    assert ok
    decoded = decode_image(data.tobytes())
    assert decoded.source_format == "TIFF" and decoded.rgb.shape == (20, 30, 3)
    if channels == 3:
        np.testing.assert_array_equal(decoded.rgb, np.rint(rgb * 255).astype(np.uint8))
    else:
        assert decoded.alpha is not None and (np.abs(decoded.alpha.astype(int) - 128) <= 1).all()


# --- truthful reasons: say what the data is, never quote it (defects 9 and 11) ------------------
def _png_with_flipped_crc(chunk: bytes) -> bytes:
    data = bytearray(images.png_rgb_bytes(8, 8))
    start = data.find(chunk)
    (length,) = np.frombuffer(bytes(data[start - 4:start]), ">u4")
    data[start + 4 + int(length)] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("chunk", [b"IHDR", b"IDAT"])
def test_png_with_a_bad_crc_is_called_corrupt_png(chunk):
    with pytest.raises(CorruptImageError) as caught:
        decode_image(_png_with_flipped_crc(chunk), name="crc.png")
    assert str(caught.value) == f"crc.png: PNG data is corrupt (bad CRC in {chunk.decode()} chunk)"


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"<!DOCTYPE html><html><body>hello</body></html>", "looks like HTML"),
        (b"PK\x03\x04" + bytes(200), "looks like a zip archive"),
        (b"%PDF-1.7\n" + bytes(100), "looks like a PDF document"),
        (images.random_bytes(), "looks like binary data"),
    ],
)
def test_non_images_say_what_they_look_like(data, kind):
    with pytest.raises(NotAnImageError, match=kind):
        decode_image(data, name="x")


def test_an_image_format_we_cannot_read_is_named():
    heic = b"\x00\x00\x00\x18ftypheic" + bytes(100)
    with pytest.raises(UnsupportedImageError, match="HEIC image: not supported"):
        decode_image(heic)


def test_no_input_content_reaches_the_error_message():
    secret = b"root:x:0:0:hunter2-S3CRET:/root:/bin/bash\n"
    with pytest.raises(NotAnImageError) as caught:
        decode_image(secret * 3, name="passwd")
    message = str(caught.value)
    assert "looks like text" in message and f"{len(secret) * 3} bytes" in message
    assert "root" not in message and "S3CRET" not in message and "hunter2" not in message


# --- ICC profiles: wide-gamut inputs become sRGB (defect 10) ------------------------------------
PATCHES = np.array([[200, 60, 40], [40, 180, 60], [30, 60, 200], [128, 128, 128],
                    [250, 240, 220], [90, 140, 30]], np.uint8)


def _adobe_tagged(fmt: str, alpha: bool = False) -> tuple[bytes, np.ndarray]:
    from PIL import Image

    stored = np.repeat(np.repeat(PATCHES[None], 16, axis=0), 16, axis=1)  # 16x96 flat patches
    pixels = np.dstack([stored, np.full(stored.shape[:2], 255, np.uint8)]) if alpha else stored
    pixels[:, :16, 3:] = 0 if alpha else pixels[:, :16, 3:]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, icc_profile=adobe_rgb_profile(),
                                 **({"quality": 97, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue(), stored


@pytest.mark.parametrize("fmt, tolerance", [("PNG", 1), ("TIFF", 1), ("JPEG", 4)])
def test_adobe_rgb_input_is_converted_to_srgb(fmt, tolerance):
    data, stored = _adobe_tagged(fmt)
    decoded = decode_image(data)
    assert decoded.icc_converted and decoded.notes == ()
    expected = adobe_to_srgb_reference(stored).astype(int)
    centre = decoded.rgb[4:12].astype(int)  # patch interiors (JPEG blocks blur the borders)
    error = np.abs(centre - expected[4:12])[:, [c for c in range(96) if 3 < c % 16 < 12]]
    assert error.max() <= tolerance
    assert np.abs(stored.astype(int) - expected).max() > 20  # the profile matters here


def test_profile_conversion_keeps_the_alpha_channel():
    data, stored = _adobe_tagged("PNG", alpha=True)
    decoded = decode_image(data)
    assert decoded.icc_converted and decoded.alpha is not None
    assert (decoded.alpha[:, :16] == 0).all() and (decoded.alpha[:, 16:] == 255).all()
    expected = adobe_to_srgb_reference(stored).astype(int)
    assert np.abs(decoded.rgb[:, 16:].astype(int) - expected[:, 16:]).max() <= 1


def test_an_unreadable_profile_is_ignored_and_said():
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(images.gradient_rgb()).save(buffer, "PNG", icc_profile=b"not a profile" * 20)
    decoded = decode_image(buffer.getvalue())
    np.testing.assert_array_equal(decoded.rgb, images.gradient_rgb())
    assert decoded.notes == ("icc-profile-ignored: unreadable profile",)


def test_an_srgb_profile_is_recognised_and_left_alone():
    from PIL import Image, ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.fromarray(images.gradient_rgb()).save(buffer, "PNG", icc_profile=srgb)
    decoded = decode_image(buffer.getvalue())
    assert not decoded.icc_converted and decoded.notes == ()
    np.testing.assert_array_equal(decoded.rgb, images.gradient_rgb())
