"""Generators for test images, good and bad: every kind the decoder must handle or refuse.

Everything is made in memory from numpy/Pillow, so tests need no fixtures on disk.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def gradient_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    """A uint8 RGB image whose every pixel is distinct enough to detect rotations and flips."""
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255 // max(1, width - 1)).astype(np.uint8)
    green = (y * 255 // max(1, height - 1)).astype(np.uint8)
    blue = ((x + y) % 256).astype(np.uint8)
    return np.dstack([red, green, blue])


def encode(array_or_image, fmt: str, **params) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(
        array_or_image
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


# --- good inputs -----------------------------------------------------------------------------
def jpeg_bytes(height: int = 48, width: int = 64) -> bytes:
    return encode(gradient_rgb(height, width), "JPEG", quality=95)


def png_rgb_bytes(height: int = 48, width: int = 64) -> bytes:
    return encode(gradient_rgb(height, width), "PNG")


def webp_bytes() -> bytes:
    return encode(gradient_rgb(), "WEBP", lossless=True)


def bmp_bytes() -> bytes:
    return encode(gradient_rgb(), "BMP")


def tiff_bytes() -> bytes:
    return encode(gradient_rgb(), "TIFF")


def gif_two_frames() -> bytes:
    """Two frames: first all red, second all blue. Only the first may be decoded."""
    red = Image.new("RGB", (32, 24), (255, 0, 0)).convert("P")
    blue = Image.new("RGB", (32, 24), (0, 0, 255)).convert("P")
    buffer = io.BytesIO()
    red.save(buffer, format="GIF", save_all=True, append_images=[blue], duration=100)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    """Pure cyan in CMYK → RGB (0, 255, 255)."""
    image = Image.new("CMYK", (40, 30), (255, 0, 0, 0))
    return encode(image, "JPEG", quality=95)


def png16_gray(values: np.ndarray) -> bytes:
    """16-bit grayscale PNG with the exact uint16 ``values``."""
    return encode(Image.fromarray(values.astype(np.uint16)), "PNG")


def png16_rgb(values: np.ndarray) -> bytes:
    """16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, channels = values.shape
    color_type = {3: 2, 4: 6}[channels]
    rows = values.astype(">u2").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return _png(header, zlib.compress(raw))


def palette_png_with_transparency() -> bytes:
    """Palette image: index 0 transparent (left half), index 1 opaque green (right half)."""
    image = Image.new("P", (20, 10), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (10, 0, 20, 10))
    return encode(image, "PNG", transparency=0)


def la_png() -> bytes:
    """Gray 200 everywhere, alpha 0 on the left half, 255 on the right."""
    gray = np.full((10, 20), 200, np.uint8)
    alpha = np.zeros((10, 20), np.uint8)
    alpha[:, 10:] = 255
    return encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG")


def rgba_png(alpha_value: int = 128) -> bytes:
    """Pure red at constant alpha."""
    rgba = np.zeros((12, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = alpha_value
    return encode(rgba, "PNG")


def exif_rotated_jpeg(orientation: int = 6, height: int = 30, width: int = 50) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(gradient_rgb(height, width), "JPEG", quality=95, exif=exif.tobytes())


def float_tiff(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32), "F"), "TIFF")


# --- bad inputs ------------------------------------------------------------------------------
def empty_bytes() -> bytes:
    return b""


def text_file() -> bytes:
    return b"name,width,height\ncat.jpg,640,480\n" * 4


def random_bytes(size: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(200, 300)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = encode(np.random.default_rng(1).integers(0, 256, (200, 300, 3), np.uint8), "PNG")
    return data[: len(data) // 2]


def corrupt_png_idat() -> bytes:
    """A PNG whose compressed pixel stream is garbage (CRC made valid so the chunk parses)."""
    header = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    return _png(header, b"\x78\x9c" + random_bytes(500, seed=3))


def giant_png_header(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny file that declares a giant image (decompression-bomb shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png(header, zlib.compress(b"\x00" * 16))


def _png(ihdr: bytes, idat: bytes) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico_bytes() -> bytes:
    """A real image in a format the pipeline refuses."""
    return encode(gradient_rgb(32, 32), "ICO")
