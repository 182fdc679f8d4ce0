"""DigestSet with its large runs on disk: same answers as a Python set, temp files cleaned up."""
import os
import random

import numpy as np
import pytest

from cutout.jobs import digests
from cutout.jobs.digests import DigestSet, merge_chunks


@pytest.fixture
def tiny_runs(monkeypatch):
    """Runs of more than 100 entries go to disk; merges read 17 entries per run at a time."""
    monkeypatch.setattr(digests, "BUFFER_ENTRIES", 32)
    monkeypatch.setattr(digests, "RAM_RUN_ENTRIES", 100)
    monkeypatch.setattr(digests, "MERGE_CHUNK_ENTRIES", 17)


def _filled(rng, batches):
    """A DigestSet and the Python set of what went in (with repeats of earlier entries)."""
    digest_set, expected = DigestSet(), set()
    for _ in range(batches):
        for _ in range(rng.randrange(1, 60)):
            value = rng.choice(sorted(expected)) if expected and rng.random() < 0.1 else rng.getrandbits(64)
            digest_set.add(value)
            expected.add(value)
        digest_set.settle()
    return digest_set, expected


def test_membership_matches_a_python_set_with_runs_on_disk(tiny_runs):
    rng = random.Random(7)
    digest_set, expected = _filled(rng, 200)
    assert digest_set.disk_bytes > 0 and isinstance(digest_set._runs[0], digests._DiskRun)
    assert os.listdir(digest_set._folder)
    probes = sorted(expected) + [rng.getrandbits(64) for _ in range(2000)] + [0, 2**64 - 1]
    assert digest_set.contains_many(probes) == [value in expected for value in probes]
    assert all((value in digest_set) == (value in expected) for value in probes[::50])
    for run in digest_set._runs:
        entries = digests._piece(run, 0, len(run))
        assert np.all(entries[1:] >= entries[:-1])
    digest_set.close()


def test_every_entry_lands_in_a_run_once_per_add(tiny_runs):
    """Nothing is lost or invented by the merges: the runs hold exactly what was settled."""
    rng = random.Random(3)
    digest_set, added = DigestSet(), []
    for _ in range(40):
        batch = {rng.getrandbits(64) for _ in range(32)}
        added.extend(batch)
        for value in batch:
            digest_set.add(value)
        digest_set.settle()
    held = np.concatenate([digests._piece(run, 0, len(run)) for run in digest_set._runs])
    assert len(digest_set) == len(added) == len(held) + len(digest_set._recent)
    assert sorted(held.tolist()) == sorted(set(added) - digest_set._recent)
    assert digest_set.disk_bytes == 8 * sum(len(run) for run in digest_set._runs if isinstance(run, digests._DiskRun))


def test_duplicates_are_found_across_disk_and_memory(tiny_runs):
    digest_set = DigestSet()
    for value in range(500):
        digest_set.add(value * 3)
        digest_set.settle()
    assert digest_set.disk_bytes > 0
    digest_set.add(3)  # again, now in the recent set too
    assert digest_set.contains_many([3, 4, 1497, 1500, 0]) == [True, False, True, False, True]
    # 480 entries were settled into runs (15 × 32); the last 20, up to 1497, are still recent
    assert digest_set.in_runs(np.array([3, 1, 1437, 1497], dtype=np.uint64)).tolist() == [True, False, True, False]


def test_merge_chunks_equals_a_full_sort():
    rng = np.random.default_rng(11)
    runs = [np.sort(rng.integers(0, 1000, size, dtype=np.uint64)) for size in (0, 1, 57, 300, 301)]
    runs.append(np.full(40, 500, dtype=np.uint64))  # many equal to one cut value
    pieces = list(merge_chunks(runs, 16))
    assert all(len(piece) <= 16 * len(runs) for piece in pieces)
    assert np.concatenate(pieces).tolist() == sorted(np.concatenate(runs).tolist())


def test_lookups_on_disk_read_only_the_page_a_value_can_be_on(monkeypatch):
    """Page fences: a run of 5,000 entries over 10 pages (the last one short); every entry, and
    values between, before and after them, answered right with 3 pages mapped at a time."""
    monkeypatch.setattr(digests, "LOOKUP_PAGES", 3)
    entries = np.arange(10, 50_010, 10, dtype=np.uint64)
    digest_set = DigestSet()
    run = digests._write_run(digest_set._new_path(), [entries[:700], entries[700:701], entries[701:]])
    assert run.fences.tolist() == entries[::digests.PAGE_ENTRIES].tolist()
    probes = np.concatenate((entries, entries + 5, np.array([0, 9, 50_010, 2**64 - 1], dtype=np.uint64)))
    assert run.contains(probes).tolist() == [True] * len(entries) + [False] * (len(entries) + 4)
    assert run.contains(np.array([], dtype=np.uint64)).tolist() == []
    digest_set.close()


def test_temp_files_are_removed_on_close_and_when_collected(tiny_runs):
    first = DigestSet()
    for value in range(300):
        first.add(value)
    first.settle()
    folder = first._folder
    assert folder and os.path.dirname(folder) == digests.tempfile.gettempdir() and os.listdir(folder)
    first.close()
    assert not os.path.exists(folder) and len(first) == 0
    for value in range(300):  # still usable after close, in a new folder
        first.add(value)
    first.settle()
    assert 299 in first and first._folder != folder
    first.close()

    second = DigestSet()
    for value in range(300):
        second.add(value)
    second.settle()
    folder = second._folder
    del second
    assert not os.path.exists(folder)


def test_small_sets_stay_in_memory():
    digest_set = DigestSet()
    for value in range(digests.BUFFER_ENTRIES + 1):
        digest_set.add(value)
    digest_set.settle()
    assert digest_set.disk_bytes == 0 and digest_set._folder is None and 1 in digest_set
