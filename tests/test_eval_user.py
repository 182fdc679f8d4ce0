"""``cutout eval --data DIR`` on a user's own folder: real photos with their real ground truth
(copied from ../shared/testdata into a temporary folder), scored through the real CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cutout.workers import metrics
from cutout import remove_background

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ["CUTOUT_EVAL_DATA"])
CHEAP = ["--model", "threshold", "--matting", "none", "--refine", "none"]  # no weights needed


def _eval(folder: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cutout.jobs.cli", "eval", "--data", str(folder), "--out", str(out), *CHEAP],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def _copy(names: list[str], source: Path, target: Path, truth: str) -> None:
    for sub in ("image", truth):
        (target / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        image = next((source / "image").glob(name + ".*"))
        shutil.copy(image, target / "image" / image.name)
        shutil.copy(source / truth / (name + ".png"), target / truth / (name + ".png"))


def test_alpha_folder_scores_every_photo_against_its_matte(tmp_path):
    folder = tmp_path / "mine"
    _copy(["GT02", "GT05"], DATA / "alphamatting_lowres", folder, "alpha")
    shutil.copy(DATA / "alphamatting_lowres" / "image" / "GT07.png", folder / "image" / "GT07.png")  # no truth
    result = _eval(folder, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "GT07.png: no alpha/GT07.* ground truth, left out" in result.stdout
    assert "CPU-s" in result.stdout
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [row["name"] for row in report["per_image"]] == ["GT02.png", "GT05.png"]
    for row in report["per_image"]:
        assert row["cpu_seconds"] > 0 and row["seconds"] > 0
        path = folder / "image" / row["name"]
        alpha = remove_background(str(path), model="threshold", matting="none", refine="none").alpha
        gt = np.asarray(Image.open(folder / "alpha" / row["name"]).convert("L"), np.float32) / 255
        assert row["sad"] == metrics.sad(alpha, gt) and row["sad"] > 1.0
    assert report["summary"]["sad"]["mean"] == np.mean([r["sad"] for r in report["per_image"]])


def test_mask_folder_leaves_the_boundary_band_out(tmp_path):
    folder = tmp_path / "masks"
    _copy(["124080", "banana1"], DATA / "grabcut_msrc", folder, "mask")
    result = _eval(folder, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    for row in report["per_image"]:
        raw = np.asarray(Image.open(folder / "mask" / (Path(row["name"]).stem + ".png")).convert("L"))
        band = (raw > 64) & (raw < 192)
        assert band.any()
        alpha = remove_background(str(folder / "image" / row["name"]), model="threshold",
                                  matting="none", refine="none").alpha
        assert row["iou"] == metrics.iou(alpha >= 0.5, raw > 192, band)
        assert row["mse"] == metrics.mse(alpha, (raw > 192).astype(np.float32), ~band)


def test_the_report_says_how_well_the_score_and_flags_find_the_bad_outputs(tmp_path):
    """GrabCut's 24077 (two objects, where the truth has one) and teddy, with the cheap threshold
    model: the counts in the report are those of the per-photo rows."""
    folder = tmp_path / "masks"
    _copy(["24077", "teddy", "banana1"], DATA / "grabcut_msrc", folder, "mask")
    result = _eval(folder, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    rows, flags = report["per_image"], report["flags"]
    bad = [row["iou"] < 0.9 for row in rows]
    assert flags["bad"] == sum(bad) and flags["images"] == 3
    for flag in ("likely_wrong", "multiple_objects"):
        flagged = [flag in row["flags"] for row in rows]
        assert flags["flags"][flag] == {"flagged": sum(flagged), "caught": sum(f and b for f, b in zip(flagged, bad))}
    scores = [row["score"] for row in rows]
    expected = metrics.roc_auc(1 - np.array(scores), np.array(bad))
    assert flags["score_auc"] == expected or (np.isnan(expected) and np.isnan(flags["score_auc"]))
    assert "quality score and flags:" in result.stdout and "likely_wrong" in result.stdout
