"""Job files: ``cutout run --config`` and ``cutout submit --config``; flags override the file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_cli_run import _disk_png

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cutout.jobs.cli", *argv], cwd=REPO, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def photos(tmp_path) -> Path:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "one.png").write_bytes(_disk_png())
    return tmp_path / "photos"


def test_run_from_the_file_alone_then_a_flag_overrides_it(tmp_path, photos):
    job = write(tmp_path / "job.toml", f"""
sources = ["{photos}"]
destination = "{tmp_path / 'out'}"
model = "threshold"
background = "color:#ff0000"
format = "png"
shard_size = 8          # submit only: `run` notes and ignores it

[pipeline]
matting = "none"
""")
    alone = cli("run", "--config", str(job), "--no-progress")
    assert alone.returncode == 0, alone.stderr
    assert "shard_size not used by `cutout run`" in alone.stderr
    with Image.open(tmp_path / "out" / "one.png") as image:
        assert image.mode == "RGB" and image.getpixel((2, 2))[0] > 200  # the file's red backdrop

    overridden = cli("run", "--config", str(job), "--format", "jpeg", "--out", str(tmp_path / "out2"), "--no-progress")
    assert overridden.returncode == 0, overridden.stderr
    assert (tmp_path / "out2" / "one.jpg").is_file() and not (tmp_path / "out2" / "one.png").exists()


@pytest.mark.parametrize("body, words", [
    ('sources = ["x"]\nbackgrund = "mask"\n', ("unknown key 'backgrund'", "background")),
    ('[pipeline]\nqueue = "gpu"\n', ("unknown key 'queue'",)),
    ('quality = 500\n', ("quality = 500", "less than or equal to 100")),
    ('matting = "magic"\n', ("matting = 'magic'", "closed-form")),
    ('background = "sparkles"\n', ("background = 'sparkles'", "unknown background")),
    ('model = "threshold\n', ("not valid TOML",)),
])
def test_bad_job_files_are_one_line_errors_naming_the_key(tmp_path, body, words):
    job = write(tmp_path / "job.toml", body)
    result = cli("submit", "--config", str(job), "--to", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"cutout: error: job file {job}"), line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists()


def test_missing_file_and_missing_sources(tmp_path):
    missing = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "No such file" in missing.stderr
    no_sources = cli("submit", "--config", str(write(tmp_path / "job.toml", 'destination = "/tmp/x"\n')))
    assert no_sources.returncode == 2 and "give at least one SOURCE" in no_sources.stderr


def test_submit_file_gives_the_same_spec_as_flags_and_carries_fields_without_a_flag(tmp_path):
    from cutout.jobs.cli import parse
    from cutout.jobs.cli_job import build_spec

    job = write(tmp_path / "job.toml", """
sources = ["s3://raw/photos/", "more.txt"]
destination = "s3://clean/photos/"
shard_size = 16
queue = "cutout-gpu"
model = "isnet-general"
classes = ["person", "dog"]
background = "blur:30"
format = "webp"
trimap-band = 0.02

[pipeline]
trimap_fg = 0.9
mask_ramp = [0.1, 0.8]
""")
    from_file = build_spec(parse(["submit", "--config", str(job)]))
    assert from_file.pipeline.trimap_fg == 0.9 and from_file.pipeline.mask_ramp == (0.1, 0.8)
    assert from_file.pipeline.classes == ("person", "dog") and from_file.pipeline.trimap_band == 0.02
    flags = ["submit", "s3://raw/photos/", "more.txt", "--to", "s3://clean/photos/", "--shard-size", "16",
             "--queue", "cutout-gpu", "--classes", "person,dog", "--background", "blur:30", "--format", "webp",
             "--trimap-band", "0.02"]
    from_flags = build_spec(parse(flags))
    assert from_flags.pipeline.model_copy(update={"trimap_fg": 0.9, "mask_ramp": (0.1, 0.8)}) == from_file.pipeline
    assert (from_file.sources, from_file.destination, from_file.shard_size, from_file.queue) == (
        from_flags.sources, from_flags.destination, from_flags.shard_size, from_flags.queue)

    overridden = build_spec(parse(["submit", "--config", str(job), "gs-free/only.txt", "--format", "png",
                                   "--to", "s3://elsewhere/"]))
    assert overridden.sources == ("gs-free/only.txt",)  # sources on the command line replace the file's
    assert overridden.pipeline.format == "png" and overridden.destination == "s3://elsewhere/"
    assert overridden.pipeline.background == "blur:30"  # the rest still comes from the file
