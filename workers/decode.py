"""Bytes → working image: ``rgb`` uint8 HxWx3 (+ ``alpha`` uint8 HxW when the input has one).

Working format
    ``rgb`` is 8-bit sRGB, EXIF orientation already applied, C-contiguous. An embedded ICC
    profile (Adobe RGB, ProPhoto, Display P3, a CMYK press profile, ...) is applied with
    littlecms (Pillow's ImageCms, perceptual intent) so colours match what a viewer shows; an
    image without one is taken as sRGB. Outputs stay untagged, which every viewer reads as sRGB.
    A profile that cannot be used (unreadable, or for another colour space than the pixels)
    is ignored and said so in ``notes``. ``alpha`` is present only when the input carries an alpha
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
    read as 16-bit when its maximum exceeds 255, else as 8-bit. Float images (``F``, and float
    RGB/RGBA TIFF, which Pillow cannot read, through OpenCV's libtiff) take their range from
    their finite values only: 0..1 when the maximum is ≤ 1, 0..255 when ≤ 255, else 0..the 99.9th
    percentile (so one huge outlier cannot blacken the image); +Inf becomes white, −Inf and NaN
    black, and an image with no finite value is a ``CorruptImageError``. Anything else raises
    ``UnsupportedImageError``.

Bad inputs
    The first bytes are sniffed so that a failure says what the data looked like ("PNG data
    is corrupt (bad CRC in IDAT chunk)", "looks like HTML (5,120 bytes)"); PNG chunk CRCs are
    checked as libpng does. No byte of the input is ever quoted in a message, a record or a log.

Safety
    The pixel count is checked from the header before pixels are decoded (``max_pixels``);
    Pillow's decompression-bomb error says so in our words (``--max-pixels``). Truncated data is an error, never
    silently padded: ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False.
"""
from __future__ import annotations

import functools
import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, TiffImagePlugin, UnidentifiedImageError

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

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "AVIF"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_CONVERTIBLE_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_TRUNCATION_HINTS = ("truncated", "premature end", "unexpected end")
_ROBUST_PERCENTILE = 99.9  # float images beyond 0..255: the top 0.1 % may clip, one outlier cannot
_ROBUST_SAMPLE = 1_000_000  # values sampled to find that percentile (exact enough, bounded time)


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # uint8 HxWx3
    alpha: np.ndarray | None  # uint8 HxW, only when the input carried (non-opaque) alpha
    source_format: str
    source_mode: str
    exif_transposed: bool
    notes: tuple[str, ...] = ()  # what decoding could not honour (e.g. an unusable ICC profile)
    icc_converted: bool = False  # an embedded ICC profile was applied (pixels are now sRGB)


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
    signature = image_signature(data)
    if signature == "TIFF":
        tags = _tiff_tags(data)
        if tags.get(339, (1,))[0] == 3 and (tags.get(277, 1) > 1 or tags.get(258, (32,))[0] != 32):
            return _decode_float_tiff(data, tags, label, max_pixels)
    with warnings.catch_warnings():
        # Our header check against max_pixels is the guard; Pillow's fixed 89 MP warning would
        # refuse what a raised --max-pixels allows.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = _open(data, label, max_pixels, signature)
        source_format, source_mode = image.format or "", image.mode
        if source_format == "PNG":
            _check_png_crcs(data, label)
        _load(image, label, max_pixels)
        icc = image.info.get("icc_profile")
        image, transposed = _apply_orientation(image, label)
    notes: list[str] = []
    image, converted = _to_srgb(image, icc, notes)
    rgb, alpha = _to_working(image, label)
    return DecodedImage(rgb, alpha, source_format, source_mode, transposed, tuple(notes), converted)


# --- what the bytes are (said without quoting them) ----------------------------------------------
_IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"), (b"qoif", "QOI"),
)
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
                b"avif": "AVIF", b"avis": "AVIF"}
_OTHER_SIGNATURES = (
    (b"%PDF-", "a PDF document"), (b"PK\x03\x04", "a zip archive"), (b"PK\x05\x06", "a zip archive"),
    (b"\x1f\x8b", "gzip data"), (b"BZh", "bzip2 data"), (b"\xfd7zXZ\x00", "xz data"),
    (b"\x28\xb5\x2f\xfd", "zstd data"), (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"), (b"\x7fELF", "an ELF executable"),
    (b"SQLite format 3\x00", "an SQLite database"), (b"%!PS", "a PostScript document"),
    (b"OggS", "Ogg media"), (b"ID3", "MP3 audio"), (b"\x1aE\xdf\xa3", "Matroska/WebM video"),
)


def image_signature(data: bytes) -> str | None:
    """The image format the first bytes announce (whether or not Pillow can read it), or None."""
    for magic, fmt in _IMAGE_SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":  # reserved bytes: not text
        return "BMP"
    if data[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(data[8:12])
    return None


def describe_data(data: bytes) -> str:
    """What non-image bytes look like ("HTML", "a zip archive", "text"), never what they say."""
    for magic, kind in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return kind
    if data[4:8] == b"ftyp":
        return "an MP4/QuickTime video"
    head = data[:2048].removeprefix(b"\xef\xbb\xbf")
    text = head.decode("utf-8", errors="replace")
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text) - text.count("\ufffd")
    if not text or printable < 0.95 * len(text):
        return "binary data of no known format"
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered[:512]:
        return "HTML"
    if lowered.startswith("<svg") or (lowered.startswith("<?xml") and "<svg" in lowered):
        return "an SVG (vector) image"
    if lowered.startswith("<?xml"):
        return "XML"
    if lowered.startswith(("{", "[")):
        return "JSON-like text"
    return "text"


def _safe_reason(message: str) -> str:
    """A decoder's message with anything quoted from the file (b'...' and '...') taken out."""
    return re.sub(r"b?(['\"]).*?\1", "(...)", message)[:200]


def _open(data: bytes, label: str, max_pixels: int, signature: str | None) -> Image.Image:
    """Parse the header only; refuse unknown formats and oversize images before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large_for_pillow(exc, label, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, label, signature) from exc
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
    _check_pixels(width, height, label, max_pixels)
    return image


def _check_pixels(width: int, height: int, label: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label}image too large: {width}x{height} = {width * height:,} pixels "
            f"> max_pixels {max_pixels:,} (checked from the header, nothing decoded; "
            f"{MAX_PIXELS_HINT})"
        )


MAX_PIXELS_HINT = "--max-pixels N raises the limit, at about the RAM per megapixel the README gives"


def _too_large_for_pillow(exc: Exception, label: str, max_pixels: int) -> ImageTooLargeError:
    """Pillow's own bomb guard, in our words: the pixel count, our limit and how to change it
    (Pillow's "could be decompression bomb DOS attack" text pointed nowhere)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than Pillow allows"
    return ImageTooLargeError(
        f"{label}image too large: {pixels} > max_pixels {max_pixels:,} (checked from the header, "
        f"nothing decoded; {MAX_PIXELS_HINT}; Pillow refuses over "
        f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} whatever the limit)"
    )


def _unidentified(data: bytes, label: str, signature: str | None) -> DecodeError:
    """Pillow recognised nothing: say what the bytes are, and why they do not decode."""
    if signature is None:
        return NotAnImageError(
            f"{label}not an image: looks like {describe_data(data)} ({len(data):,} bytes)"
        )
    if signature not in SUPPORTED_FORMATS or signature not in Image.OPEN:
        return UnsupportedImageError(
            f"{label}{signature} image: not supported here; use one of "
            + ", ".join(sorted(SUPPORTED_FORMATS))
        )
    if signature == "PNG":
        _check_png_crcs(data, label)
    try:  # the format's own parser says what is wrong (Image.open only says "cannot identify")
        Image.OPEN[signature][0](io.BytesIO(data), "")
        reason = "the decoder refused it"
    except Exception as exc:  # noqa: BLE001 - any parser complaint is the reason we report
        reason = _safe_reason(str(exc)) or type(exc).__name__
    return CorruptImageError(f"{label}{signature} data is corrupt ({reason})")


_PNG_CRITICAL_CHUNKS = (b"IHDR", b"PLTE", b"IDAT", b"IEND")


def _check_png_crcs(data: bytes, label: str) -> None:
    """Refuse a PNG whose critical chunks fail their CRC, as libpng does (Pillow reads past a
    bad IDAT CRC; zlib's own check then catches only some damage). A chunk cut short is left
    to the decoder, which reports truncation."""
    position = 8
    while position + 12 <= len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        end = position + 8 + length
        if end + 4 > len(data):
            return
        if kind in _PNG_CRITICAL_CHUNKS:
            (stored,) = struct.unpack(">I", data[end:end + 4])
            if zlib.crc32(data[position + 4:end]) & 0xFFFFFFFF != stored:
                raise CorruptImageError(
                    f"{label}PNG data is corrupt (bad CRC in {kind.decode()} chunk)"
                )
        if kind == b"IEND":
            return
        position = end + 4


def _load(image: Image.Image, label: str, max_pixels: int) -> None:
    """Decode every pixel now, so truncation surfaces here and not later."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large_for_pillow(exc, label, max_pixels) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise _load_error(exc, label, "pixel data") from exc


def _load_error(exc: Exception, label: str, part: str) -> DecodeError:
    message = str(exc)
    lowered = message.lower()
    if "decompressed data too large" in lowered:
        return ImageTooLargeError(f"{label}decompression bomb refused: {message}")
    if isinstance(exc, EOFError) or any(hint in lowered for hint in _TRUNCATION_HINTS):
        return TruncatedImageError(
            f"{label}truncated image: {part} ends early ({_safe_reason(message)})"
        )
    return CorruptImageError(
        f"{label}corrupt image {part}: {type(exc).__name__}: {_safe_reason(message)}"
    )


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
        gray = _high_depth_to_uint8(np.asarray(image), mode, label)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)), None
    if mode == "P" and "transparency" in image.info or mode in _ALPHA_MODES:
        return _split_alpha(np.asarray(image.convert("RGBA")))
    if mode in _CONVERTIBLE_MODES:
        return np.ascontiguousarray(np.asarray(image.convert("RGB"))), None
    raise UnsupportedImageError(f"{label}unsupported image mode {mode} ({image.format})")


def _high_depth_to_uint8(values: np.ndarray, mode: str, label: str = "") -> np.ndarray:
    """Scale 16-bit / 32-bit / float gray to 8 bit by range, rounding (never clipping high bits)."""
    if mode == "F":
        return _float_to_uint8(values, label)
    values = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, label: str = "") -> np.ndarray:
    """Float pixels → uint8 by the range of their finite values (see the module docstring)."""
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if not all_finite and not finite.any():
        raise CorruptImageError(f"{label}float image has no finite pixel value (all NaN or Inf)")
    kept = values if all_finite else values[finite]
    top = float(kept.max())
    if top <= 1.0:
        scale = 255.0
    elif top <= 255.0:
        scale = 1.0
    else:
        sample = kept.ravel()[:: max(1, kept.size // _ROBUST_SAMPLE)]
        scale = 255.0 / max(float(np.percentile(sample, _ROBUST_PERCENTILE)), 1e-12)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = values * np.float32(scale)
    if not all_finite:
        scaled = np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled).astype(np.uint8)


# --- float colour TIFF (Pillow has no mode for it; OpenCV's libtiff reads it) ---------------------
def _tiff_tags(data: bytes) -> dict:
    """The first IFD's tags, read without decoding pixels (empty when it does not parse)."""
    try:
        tags = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(tags.next)
        tags.load(stream)
        return dict(tags)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, KeyError, TypeError):
        return {}


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _decode_float_tiff(data: bytes, tags: dict, label: str, max_pixels: int) -> DecodedImage:
    """Float RGB/RGBA (and 16/64-bit float) TIFF: size checked from the tags, pixels by OpenCV."""
    import cv2

    width, height = int(tags.get(256, 0)), int(tags.get(257, 0))
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"{label}TIFF data is corrupt (no image size in its header)")
    _check_pixels(width, height, label, max_pixels)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or not np.issubdtype(pixels.dtype, np.floating):
        raise UnsupportedImageError(
            f"{label}float TIFF with {tags.get(277, 1)} samples per pixel "
            f"(bits {tags.get(258)}, compression {tags.get(259)}) could not be decoded"
        )
    if pixels.ndim == 2:
        rgb, alpha = np.repeat(_float_to_uint8(pixels, label)[:, :, None], 3, axis=2), None
    else:
        order = [2, 1, 0, 3][: pixels.shape[2]] if pixels.shape[2] >= 3 else [0]
        pixels = pixels[:, :, order]
        rgb = _float_to_uint8(pixels[:, :, :3], label)
        if pixels.shape[2] == 4:
            rgb, alpha = _split_alpha(np.dstack([rgb, _float_to_uint8(pixels[:, :, 3], label)]))
        else:
            rgb = np.repeat(rgb[:, :, :1], 3, axis=2) if rgb.shape[2] == 1 else rgb
            alpha = None
    method = _ORIENTATION_TRANSPOSE.get(tags.get(274, 1))
    if method is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(method))
        alpha = None if alpha is None else np.asarray(Image.fromarray(alpha).transpose(method))
    mode = f"RGB{'A' if alpha is not None else ''};float{tags.get(258, (32,))[0]}"
    return DecodedImage(np.ascontiguousarray(rgb), alpha, "TIFF", mode, method is not None)


# --- colour management ------------------------------------------------------------------------------
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_PROFILE_SPACES = {"RGB ": ("RGB", "RGBA"), "CMYK": ("CMYK",), "GRAY": ("L",)}


def _to_srgb(image: Image.Image, icc: bytes | None, notes: list[str]) -> tuple[Image.Image, bool]:
    """Apply the embedded ICC profile (if any) so the pixels are sRGB; say so when it is unusable."""
    if not icc:
        return image, False
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
    except (OSError, ImageCms.PyCMSError, ValueError, TypeError):
        notes.append("icc-profile-ignored: unreadable profile")
        return image, False
    if space == "RGB " and _is_srgb(profile.profile):
        return image, False  # most camera JPEGs: converting would cost ~17 ms/MP for nothing
    has_alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    if space == "RGB " and image.mode in _CONVERTIBLE_MODES | _ALPHA_MODES and image.mode not in (
            "1", "L", "CMYK"):
        image = image.convert("RGBA" if has_alpha else "RGB")
    if image.mode not in _PROFILE_SPACES.get(space, ()):
        notes.append(f"icc-profile-ignored: a {space.strip() or 'unknown'} profile on "
                     f"{image.mode} pixels")
        return image, False
    out_mode = "RGBA" if image.mode == "RGBA" else "RGB"
    try:
        transform = _srgb_transform(icc, image.mode, out_mode)
        return ImageCms.applyTransform(image, transform), True
    except (OSError, ImageCms.PyCMSError, ValueError) as exc:
        notes.append(f"icc-profile-ignored: {type(exc).__name__}")
        return image, False


def _is_srgb(profile) -> bool:
    """An sRGB profile by name and by primaries (a renamed wide-gamut profile is still converted)."""
    colorants = (profile.red_colorant, profile.green_colorant, profile.blue_colorant)
    reference = (_SRGB.profile.red_colorant, _SRGB.profile.green_colorant,
                 _SRGB.profile.blue_colorant)
    if "srgb" not in (profile.profile_description or "").lower() or None in colorants:
        return False
    return all(abs(a - b) < 0.005 for got, want in zip(colorants, reference)
               for a, b in zip(got[0], want[0]))


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform:
    """One transform per distinct profile (photos of one camera share theirs). NOCACHE keeps a
    transform safe to share between threads (littlecms's one-pixel cache is not)."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(profile, _SRGB, in_mode, out_mode,
                                   flags=ImageCms.Flags.NOCACHE)


def _split_alpha(rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Composite colour over white (see module docstring); drop a fully opaque alpha."""
    alpha = np.ascontiguousarray(rgba[:, :, 3])
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[:, :, :3]), None
    a = alpha[:, :, None].astype(np.float32) / 255.0
    rgb = rgba[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), alpha
