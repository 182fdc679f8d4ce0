"""Bytes → working image: ``rgb`` uint8 HxWx3 (+ ``alpha`` uint8 HxW when the input has one).

Working format
    ``rgb`` is 8-bit sRGB-as-stored (embedded ICC profiles are not applied), EXIF orientation
    already applied, C-contiguous. ``alpha`` is present only when the input carries an alpha
    channel (RGBA, LA, palette with transparency, ...) that is not fully opaque.

Inputs that carry alpha
    ``rgb`` is the colour composited over WHITE (``c·a + 255·(1−a)``). The colour stored under
    fully transparent pixels is arbitrary (often black or stale), so it must not reach the
    segmenter or the matting solver; white is the neutral studio background most transparent
    product shots were cut from. The pipeline multiplies its predicted alpha by ``alpha``, so
    pixels that were already transparent stay transparent.

Modes
    JPEG, MPO, PNG, WebP, BMP, TIFF, GIF (first frame) and AVIF where Pillow supports it.
    1/L/P/PA/LA/La/RGB/RGBX/RGBA/RGBa/CMYK/YCbCr/HSV convert through Pillow. 16-bit gray
    (I;16*) is scaled ``round(v / 257)``; 16-bit RGB(A) PNG/TIFF arrive from Pillow as the high
    byte (``v >> 8``, within one level of ``v / 257``): scaled, never clipped. ``I`` (32-bit int) is
    read as 16-bit when its maximum exceeds 255, else as 8-bit; ``F`` as 0..1 when its maximum
    is ≤ 1, else as 0..255. Anything else raises ``UnsupportedImageError``.

Safety
    The pixel count is checked from the header before pixels are decoded (``max_pixels``);
    Pillow's decompression-bomb warning is an error here. Truncated data is an error, never
    silently padded: ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cutout.jobs.errors import (
    ConfigError,
    DecodeError,
    EmptyInputError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "AVIF"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_TRUNCATION_HINTS = ("truncated", "premature end", "unexpected end")


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # uint8 HxWx3
    alpha: np.ndarray | None  # uint8 HxW, only when the input carried (non-opaque) alpha
    source_format: str
    source_mode: str
    exif_transposed: bool


def decode_image(data: bytes, *, max_pixels: int = 64_000_000, name: str = "") -> DecodedImage:
    """Decode ``data`` into the working format, or raise a typed ``DecodeError``."""
    label = f"{name}: " if name else ""
    if not data:
        raise EmptyInputError(f"{label}empty input (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ConfigError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would be silently "
            "padded; leave it False"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(data, label, max_pixels)
        source_format, source_mode = image.format or "", image.mode
        _load(image, label)
        image, transposed = _apply_orientation(image, label)
    rgb, alpha = _to_working(image, label)
    return DecodedImage(rgb, alpha, source_format, source_mode, transposed)


def _open(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """Parse the header only; refuse unknown formats and oversize images before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{label}decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImageError(
            f"{label}not an image: no known image signature ({len(data)} bytes, "
            f"starts {data[:8]!r})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _load_error(exc, label, "header") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            f"{label}unsupported image format {image.format}: use one of "
            + ", ".join(sorted(SUPPORTED_FORMATS))
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"{label}image header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label}image too large: {width}x{height} = {width * height:,} pixels "
            f"> max_pixels {max_pixels:,} (checked from the header, nothing decoded)"
        )
    return image


def _load(image: Image.Image, label: str) -> None:
    """Decode every pixel now, so truncation surfaces here and not later."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{label}decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise _load_error(exc, label, "pixel data") from exc


def _load_error(exc: Exception, label: str, part: str) -> DecodeError:
    message = str(exc)
    lowered = message.lower()
    if "decompressed data too large" in lowered:
        return ImageTooLargeError(f"{label}decompression bomb refused: {message}")
    if isinstance(exc, EOFError) or any(hint in lowered for hint in _TRUNCATION_HINTS):
        return TruncatedImageError(f"{label}truncated image: {part} ends early ({message})")
    return DecodeError(f"{label}corrupt image {part}: {type(exc).__name__}: {message}")


def _apply_orientation(image: Image.Image, label: str) -> tuple[Image.Image, bool]:
    """Rotate/flip as the EXIF Orientation tag says; report whether anything changed."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"{label}corrupt EXIF block: {exc}") from exc
    if orientation in (None, 1):
        return image, False
    return ImageOps.exif_transpose(image), orientation in range(2, 9)


def _to_working(image: Image.Image, label: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        gray = _high_depth_to_uint8(np.asarray(image), mode)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)), None
    if mode == "P" and "transparency" in image.info or mode in _ALPHA_MODES:
        return _split_alpha(np.asarray(image.convert("RGBA")))
    if mode in _CONVERTIBLE_MODES:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"))), None
    raise UnsupportedImageError(f"{label}unsupported image mode {mode} ({image.format})")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit / 32-bit / float gray to 8 bit by range, rounding (never clipping high bits)."""
    values = values.astype(np.float64)
    if mode == "F":
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0
    elif mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
        scale = 1.0 / 257.0
    else:
        scale = 1.0
    scaled = np.nan_to_num(values * scale, nan=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _split_alpha(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Composite colour over white (see module docstring); drop a fully opaque alpha."""
    alpha = np.ascontiguousarray(rgba[:, :, 3])
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3]), None
    a = alpha[:, :, None].astype(np.float32) / 255.0
    rgb = rgba[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), alpha
