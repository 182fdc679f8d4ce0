"""Local atomic writes (``jobs/storage.py`` ``_local_atomic``): long names and normal permissions."""
from __future__ import annotations

import os
import stat

import pytest

from cutout.jobs import storage
from cutout.jobs.errors import StorageError


@pytest.mark.parametrize("length", [241, 250, 255])
def test_a_name_the_file_system_accepts_can_be_written(tmp_path, length):
    """The old temp name ``.<name>.<random>.tmp`` overflowed 255 bytes from about 241 on."""
    name = "x" * (length - 4) + ".png"
    target = tmp_path / name
    storage.write_bytes(str(target), b"data")
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == [name]  # no temp file left behind


def test_a_name_over_the_limit_is_a_typed_error_and_leaves_nothing(tmp_path):
    with pytest.raises(StorageError, match="cannot write"):
        storage.write_bytes(str(tmp_path / ("y" * 256 + ".png")), b"data")
    assert os.listdir(tmp_path) == []


def test_files_get_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        storage.write_bytes(str(tmp_path / "a.png"), b"data")
        storage.write_bytes((tmp_path / "b.png").as_uri(), b"data")
    finally:
        os.umask(previous)
    for name in ("a.png", "b.png"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def test_an_overwrite_replaces_the_file_atomically(tmp_path):
    target = tmp_path / "a.png"
    storage.write_bytes(str(target), b"old")
    storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.png"]


def test_a_temp_folder_keeps_temp_files_away_from_the_outputs(tmp_path):
    outputs, temps = tmp_path / "out", tmp_path / "out" / "_cutout" / "tmp"
    storage.write_bytes(str(outputs / "sub" / "a.png"), b"data", temp_dir=str(temps))
    assert (outputs / "sub" / "a.png").read_bytes() == b"data"
    assert os.listdir(outputs / "sub") == ["a.png"] and os.listdir(temps) == []


def test_a_writer_killed_mid_write_leaves_its_temp_in_the_temp_folder_where_a_sweep_removes_it(tmp_path):
    """A real process killed (SIGKILL) between creating its temp file and renaming it."""
    import subprocess
    import sys
    import time

    outputs, temps = tmp_path / "out", tmp_path / "tmp"
    child = (
        "import os, signal, sys\n"
        "from cutout.jobs import storage\n"
        "def fill(handle):\n"
        "    handle.write(b'partial'); handle.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "storage._local_atomic(sys.argv[1], fill, sys.argv[2])\n"
    )
    killed = subprocess.run([sys.executable, "-c", child, str(outputs / "a.png"), str(temps)])
    assert killed.returncode == -9
    assert os.listdir(outputs) == []  # nothing among the outputs
    (left,) = os.listdir(temps)
    assert left.startswith(".cutout-")
    assert storage.sweep_temp_folder(str(temps)) == 0  # young: may be a live writer's
    old = time.time() - storage.TEMP_STALE_S - 60
    os.utime(temps / left, (old, old))
    assert storage.sweep_temp_folder(str(temps)) == 1 and os.listdir(temps) == []
