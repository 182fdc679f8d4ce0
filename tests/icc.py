"""Hand-built ICC v2 matrix/TRC profiles, so tests can tag images with a real wide-gamut
colour space (Adobe RGB 1998) without shipping an .icc file or relying on one being installed.
"""
from __future__ import annotations

import struct

import numpy as np

D50 = np.array([0.9642, 1.0, 0.8249])
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367],
                      [0.0389, -0.0685, 1.0296]])

# Chromaticities (x, y) of the red, green, blue primaries and the white point; TRC gamma.
ADOBE_RGB = {"primaries": ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06)),
             "white": (0.3127, 0.3290), "gamma": 563 / 256}
SRGB_PRIMARIES = {"primaries": ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06)),
                  "white": (0.3127, 0.3290)}


def rgb_to_xyz_matrix(primaries, white) -> np.ndarray:
    """Linear RGB → XYZ (relative to ``white``), the textbook construction from chromaticities."""
    def xyz(x, y):
        return np.array([x / y, 1.0, (1 - x - y) / y])

    columns = np.stack([xyz(*p) for p in primaries], axis=1)
    scale = np.linalg.solve(columns, xyz(*white))
    return columns * scale


def _adapt_to_d50(matrix: np.ndarray, white) -> np.ndarray:
    source = _BRADFORD @ (matrix @ np.ones(3))
    target = _BRADFORD @ D50
    adapt = np.linalg.inv(_BRADFORD) @ np.diag(target / source) @ _BRADFORD
    return adapt @ matrix


def matrix_profile(primaries, white, gamma: float, description: str = "test RGB") -> bytes:
    """An ICC v2 display profile: colorants adapted to D50 (Bradford), one gamma per channel."""
    colorants = _adapt_to_d50(rgb_to_xyz_matrix(primaries, white), white)

    def s15(value: float) -> bytes:
        return struct.pack(">i", int(round(value * 65536)))

    def xyz_tag(values) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(s15(v) for v in values)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, int(round(gamma * 256))) + b"\0\0"
    text = description.encode("ascii") + b"\0"
    desc = (b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0) + b"\0" * 67)
    tags = [(b"desc", desc), (b"wtpt", xyz_tag(D50)), (b"cprt", b"text\0\0\0\0none\0"),
            (b"rXYZ", xyz_tag(colorants[:, 0])), (b"gXYZ", xyz_tag(colorants[:, 1])),
            (b"bXYZ", xyz_tag(colorants[:, 2])),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, payload in tags:
        payload += b"\0" * (-len(payload) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(payload))
        body += payload
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr"
              + b"RGB XYZ " + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + b"\0" * 24
              + struct.pack(">I", 0) + b"".join(s15(v) for v in D50) + b"\0" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def adobe_rgb_profile() -> bytes:
    return matrix_profile(ADOBE_RGB["primaries"], ADOBE_RGB["white"], ADOBE_RGB["gamma"],
                          "test Adobe RGB (1998)")


def adobe_to_srgb_reference(rgb: np.ndarray) -> np.ndarray:
    """Adobe RGB uint8 → sRGB uint8 by the colour-science formulas alone (no littlecms)."""
    linear = (rgb.astype(np.float64) / 255.0) ** ADOBE_RGB["gamma"]
    to_xyz = rgb_to_xyz_matrix(ADOBE_RGB["primaries"], ADOBE_RGB["white"])
    from_xyz = np.linalg.inv(rgb_to_xyz_matrix(SRGB_PRIMARIES["primaries"], SRGB_PRIMARIES["white"]))
    srgb_linear = np.clip(linear @ (from_xyz @ to_xyz).T, 0.0, 1.0)
    encoded = np.where(srgb_linear <= 0.0031308, 12.92 * srgb_linear,
                       1.055 * srgb_linear ** (1 / 2.4) - 0.055)
    return np.rint(encoded * 255.0).astype(np.uint8)
