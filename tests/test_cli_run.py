"""``cutout run`` as a user runs it: a real subprocess over a nested folder of good and bad files."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cutout.jobs.records import QUALITY_FLAGS
from cutout.workers import quality
from tests import images
from tests.services import interruptible

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
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022),
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
    for path in (out / "top.png", out / "a/b/deep.png", out / "_cutout_run.jsonl"):
        assert path.stat().st_mode & 0o777 == 0o644  # as `open` makes them, not mkstemp's 0600
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
    (record,) = _records(out)  # the quality score is stored with the measurements it came from
    assert 0.0 <= record["quality"]["score"] <= 1.0
    assert record["quality"]["score"] == pytest.approx(quality.score(record["quality"]), abs=2e-3)
    assert set(record["flags"]) <= set(QUALITY_FLAGS)


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
    records = {Path(r["input_uri"]).name: r for r in _records(out)}
    assert "hand-trimap: segmentation skipped" in records["disk.png"]["notes"]
    assert "segment" not in records["disk.png"]["timings"]  # the model never saw it
    assert "no-hand-trimap: segmented by the model" in records["other.png"]["notes"]
    assert "segment" in records["other.png"]["timings"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "_cutout_run.jsonl").read_text().splitlines()]


def _stamps(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.png")}


def test_run_gives_every_odd_name_one_record_and_writes_the_rest(tmp_path):
    """Tab and newline in names, a `_cutout/` folder, a 250-byte name: mapped or recorded,
    never the end of the run (it used to stop at the first with no output and no record)."""
    source, out = tmp_path / "photos", tmp_path / "out"
    (source / "_cutout").mkdir(parents=True)
    names = ["tab\tname.png", "new\nline.png", "_cutout/inside.png", "l" * 246 + ".png", "good.png",
             "ünïcode ✓.png"]
    for name in names:
        (source / name).write_bytes(_disk_png())
    # a 251-byte stem twice: the second's collision name (N.png.png) is over 255 bytes
    (source / ("c" * 251 + ".jpg")).write_bytes(images.jpeg_bytes())
    (source / ("c" * 251 + ".png")).write_bytes(_disk_png())
    result = _run(str(source), "--out", str(out), "--model", "threshold", "--no-progress")
    assert result.returncode == 3, result.stderr
    records = {r["input_uri"]: r for r in _records(out)}
    assert sorted(records) == sorted(str(p) for p in source.rglob("*.*") if p.is_file())
    failed = {uri: r for uri, r in records.items() if r["status"] == "failed"}
    assert list(failed) == [str(source / ("c" * 251 + ".png"))]
    assert failed[str(source / ("c" * 251 + ".png"))]["error_class"] == "OutputWriteError"
    outputs = [Path(r["output_uris"][0]) for r in records.values() if r["status"] == "done"]
    assert all(path.is_file() and out in path.parents for path in outputs)
    assert (out / ("l" * 246 + ".png")).is_file() and (out / "ünïcode ✓.png").is_file()
    unnamed = sorted(p.parent.name for p in outputs if "\t" in str(p) or "\n" in str(p) or "_cutout" in str(p))
    assert unnamed == []  # unsafe names were mapped to _unnamed/<hash>
    assert len(list((out / "_unnamed").glob("*.png"))) == 3


def test_run_resumes_skips_done_inputs_and_redoes_changed_ones(tmp_path):
    source, out = tmp_path / "photos", tmp_path / "out"
    source.mkdir()
    for index in range(3):
        (source / f"p{index}.png").write_bytes(_disk_png(index * 5))
    (source / "bad.png").write_bytes(images.text_file())
    base = [str(source), "--out", str(out), "--model", "threshold", "--no-progress"]
    first = _run(*base)
    assert first.returncode == 3, first.stderr
    stamps = _stamps(out)
    assert len(stamps) == 3 and len(_records(out)) == 4

    again = _run(*base)  # nothing changed: the done inputs are skipped, the failed one retried
    assert again.returncode == 3, again.stderr
    assert "already done with these settings (skipped; --overwrite redoes them): 3" in again.stdout
    assert _stamps(out) == stamps
    assert len(_records(out)) == 4  # still one line per input

    (source / "p1.png").write_bytes(_disk_png(20))  # an edited input is redone, alone
    edited = _run(*base)
    changed = {k for k, v in _stamps(out).items() if stamps[k] != v}
    assert changed == {"p1.png"}, edited.stderr

    stamps = _stamps(out)
    other_config = _run(*base, "--background", "color:#00ff00")
    assert "skipped" not in other_config.stdout
    assert all(_stamps(out)[k] != v for k, v in stamps.items())
    assert len({r["config_hash"] for r in _records(out)}) == 1 and len(_records(out)) == 4

    stamps = _stamps(out)
    forced = _run(*base, "--background", "color:#00ff00", "--overwrite")
    assert forced.returncode == 3 and "skipped" not in forced.stdout
    assert all(_stamps(out)[k] != v for k, v in stamps.items())
    assert len(_records(out)) == 4


def test_run_output_inside_the_input_folder_is_never_read_back(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "a.png").write_bytes(_disk_png())
    (source / "a.jpg").write_bytes(images.jpeg_bytes())  # same output name: both are kept
    out = source / "cutouts"
    for _ in range(2):
        result = _run(str(source), "--out", str(out), "--model", "threshold", "--no-progress", "--overwrite")
        assert result.returncode == 0, result.stderr
        assert sorted(r["input_uri"] for r in _records(out)) == [str(source / "a.jpg"), str(source / "a.png")]
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "a.png.png"]


def test_run_refuses_an_object_store_output_before_anything_runs(tmp_path):
    photo = tmp_path / "one.png"
    photo.write_bytes(_disk_png())
    result = _run(str(photo), "--out", "s3://some-bucket/out/", "--model", "threshold")
    assert result.returncode == 2  # a usage error
    assert "cutout run writes to a local folder" in result.stderr and "cutout submit" in result.stderr
    assert "loaded" not in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_keeps_the_records_so_far_and_a_rerun_finishes(tmp_path):
    source, out = tmp_path / "photos", tmp_path / "out"
    source.mkdir()
    for index in range(60):
        (source / f"img_{index:03d}.png").write_bytes(_disk_png(index % 30))
    args = [sys.executable, "-m", "cutout.jobs.cli", "run", str(source), "--out", str(out), "--model",
            "threshold", "--no-progress", "--batch-size", "1", "--matting", "closed-form"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    records_file = out / "_cutout_run.jsonl"
    deadline = time.monotonic() + 120
    while not (records_file.exists() and records_file.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "interrupted:" in stdout and "run the same command again" in stdout
    partial = _records(out)  # every line is a whole, valid record
    assert 3 <= len(partial) < 60
    assert all(r["status"] == "done" and Path(r["output_uris"][0]).is_file() for r in partial)

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped; --overwrite redoes them): {len(partial)}" in rerun.stdout
    assert sorted(r["input_uri"] for r in _records(out)) == sorted(str(p) for p in source.glob("*.png"))
    assert len(list(out.glob("*.png"))) == 60
    nothing_left = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert nothing_left.returncode == 0 and "skipped; --overwrite redoes them): 60" in nothing_left.stdout
    assert "loaded" not in nothing_left.stderr  # nothing for the model to do: it is never loaded


def test_a_run_leaves_only_outputs_and_sweeps_what_a_killed_run_left(tmp_path):
    """Outputs are written in ``OUT/_cutout_run.tmp`` and renamed into place; the folder is
    gone after a run, and a temp file a killed run left there an hour ago is swept."""
    source, out = tmp_path / "photos", tmp_path / "out"
    source.mkdir()
    (source / "one.png").write_bytes(_disk_png())
    left = out / "_cutout_run.tmp" / ".cutout-0123456789ab.tmp"  # what kill -9 mid-write leaves
    left.parent.mkdir(parents=True)
    left.write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(left, (old, old))
    result = _run(str(source), "--out", str(out), "--model", "threshold", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["_cutout_run.jsonl", "one.png"]
