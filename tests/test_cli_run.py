"""``cutout run`` as a user runs it: a real subprocess over a nested folder of good and bad files."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests import images

REPO = Path(__file__).resolve().parents[1]


def _disk_png(offset: int = 0) -> bytes:
    rgb = np.full((90, 120, 3), 210, np.uint8)
    yy, xx = np.mgrid[0:90, 0:120]
    rgb[(yy - 45) ** 2 + (xx - 60 - offset) ** 2 < 900] = (30, 60, 200)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _make_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.png").write_bytes(_disk_png())
    (root / "a" / "left.jpg").write_bytes(images.exif_rotated_jpeg())
    (root / "a" / "b" / "deep.png").write_bytes(_disk_png(10))
    (root / "a" / "b" / "palette.png").write_bytes(images.palette_png_with_transparency())
    (root / "a" / "empty.png").write_bytes(images.empty_bytes())
    (root / "a" / "b" / "cut.jpg").write_bytes(images.truncated_jpeg())
    (root / "a" / "fake.jpg").write_bytes(images.text_file())
    (root / "readme.txt").write_text("not an image, and not listed: wrong extension")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "run", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )


def test_run_mirrors_folders_and_reports_bad_files(tmp_path):
    source, out = tmp_path / "photos", tmp_path / "out"
    _make_tree(source)
    result = _run(str(source), "--out", str(out), "--model", "threshold", "--no-progress")
    assert result.returncode == 3, result.stderr  # some inputs failed, the rest were written
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a/b/deep.png", "a/b/palette.png", "a/left.png", "top.png"]
    for path in written:
        with Image.open(out / path) as image:
            assert image.mode == "RGBA"
    with Image.open(out / "a/left.png") as rotated:  # EXIF orientation 6 applied: 50x30 -> 30x50
        assert rotated.size == (30, 50)
    records = [json.loads(line) for line in (out / "_cutout_run.jsonl").read_text().splitlines()]
    assert len(records) == 7  # every image-named input exactly once; readme.txt is not an image
    failed = {Path(r["input_uri"]).name: r for r in records if r["status"] == "failed"}
    assert {name: r["error_class"] for name, r in failed.items()} == {
        "empty.png": "EmptyInputError",
        "cut.jpg": "TruncatedImageError",
        "fake.jpg": "NotAnImageError",
    }
    assert all(r["stage"] == "decode" and r["error"] for r in failed.values())
    assert "processed 4, failed 3 of 7" in result.stdout
    assert "EmptyInputError" in result.stdout


def test_run_single_file_all_good_exits_zero(tmp_path):
    photo = tmp_path / "one.png"
    photo.write_bytes(_disk_png())
    out = tmp_path / "out"
    result = _run(str(photo), "--out", str(out), "--model", "threshold", "--no-progress",
                  "--background", "color:#ff0000", "--format", "jpeg")
    assert result.returncode == 0, result.stderr
    with Image.open(out / "one.jpg") as image:
        assert image.mode == "RGB"
        assert image.getpixel((2, 2))[0] > 200  # red backdrop


def test_run_refuses_conflicting_options(tmp_path):
    photo = tmp_path / "one.png"
    photo.write_bytes(_disk_png())
    result = _run(str(photo), "--out", str(tmp_path / "o"), "--format", "jpeg")
    assert result.returncode == 2  # a configuration error (README, "Exit codes")
    assert "jpeg cannot carry transparency" in result.stderr


def test_run_uses_hand_made_trimaps_from_a_folder(tmp_path):
    """A trimap that declares the whole left half background wins over the model's mask."""
    photos, trimaps, out = tmp_path / "photos", tmp_path / "trimaps", tmp_path / "out"
    (photos / "set").mkdir(parents=True)
    (trimaps / "set").mkdir(parents=True)
    (photos / "set" / "disk.png").write_bytes(_disk_png())
    (photos / "other.png").write_bytes(_disk_png())  # no trimap: the automatic one
    trimap = np.full((90, 120), 128, np.uint8)
    trimap[:, :60] = 0
    trimap[40:50, 85:95] = 255
    buffer = io.BytesIO()
    Image.fromarray(trimap).save(buffer, format="PNG")
    (trimaps / "set" / "disk.png").write_bytes(buffer.getvalue())
    result = _run(str(photos), "--out", str(out), "--model", "threshold", "--no-progress",
                  "--trimaps", str(trimaps))
    assert result.returncode == 0, result.stderr
    with Image.open(out / "set" / "disk.png") as guided, Image.open(out / "other.png") as auto:
        guided_alpha = np.asarray(guided)[..., 3]
        auto_alpha = np.asarray(auto)[..., 3]
    assert (guided_alpha[:, :60] == 0).all()  # the trimap's background is honoured
    assert auto_alpha[:, 30:60].max() == 255  # ...where the automatic mask kept the disk
    assert guided_alpha[45, 90] == 255
