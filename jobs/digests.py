"""A set of 64-bit digests in about 8 bytes each, for the checks submit makes once per input.

Why not a Python ``set``: a set of 8-byte ``bytes`` costs about 70 bytes per entry (7 GB for
10^8 output keys). Here entries live in sorted numpy ``uint64`` runs, merged so that there are
only a few (each at least twice the size of the next), plus a small Python set of the newest
entries. Lookups of a whole batch are one ``searchsorted`` per run. Two different keys share a
digest with odds of about n²/2^65 (3 in 10,000 at 10^8 keys), as with the set of bytes before.

Why runs spill to disk: at 10^8 inputs the runs alone are 0.8 GB. A run of more than
``RAM_RUN_ENTRIES`` lives in a file in a private temp folder (memory-mapped, read-only), built by
a merge that streams ``MERGE_CHUNK_ENTRIES`` at a time, so memory stays flat whatever the job
size. The first entry of each 4 KiB page of such a file stays in memory (1/512 of the run), so
a lookup reads just the one page its value can be on, ``LOOKUP_PAGES`` pages at a time, handed
back to the page cache after each group (a plain binary search over the mapping would map most
of the file per batch: the kernel maps 64 KiB around every page fault). The folder is removed
on ``close``, when the set is garbage-collected, and at exit.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
import weakref

import numpy as np

BUFFER_ENTRIES = 1 << 18  # newest entries kept in a Python set before they become a sorted run
RAM_RUN_ENTRIES = 1 << 22  # a larger run (32 MiB) lives in a temp file instead of memory
MERGE_CHUNK_ENTRIES = 1 << 20  # entries per run read at a time by a merge into a file
LOOKUP_PAGES = 256  # pages of a run on disk mapped at once by a lookup (about 16 MiB with fault-around)
PAGE_ENTRIES = 512  # uint64 entries per 4 KiB page


def digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class DigestSet:
    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._runs: list = []  # sorted, largest first: np.ndarray in memory, _DiskRun on disk
        self._folder: str | None = None  # the private temp folder, made at the first disk run
        self._files = 0
        self._remove_folder = None

    def __len__(self) -> int:  # counts an entry added twice twice (runs are not deduplicated)
        return len(self._recent) + sum(len(run) for run in self._runs)

    def __enter__(self) -> "DigestSet":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def nbytes(self) -> int:
        """Memory held (of a run on disk, only its page fences: see ``disk_bytes``)."""
        held = sum(run.fences.nbytes if _on_disk(run) else run.nbytes for run in self._runs)
        return held + 70 * len(self._recent)

    @property
    def disk_bytes(self) -> int:
        return sum(run.nbytes for run in self._runs if _on_disk(run))

    def close(self) -> None:
        """Forget every entry and remove the temp files."""
        self._recent = set()
        self._runs = []
        if self._remove_folder is not None:
            self._remove_folder()
        self._folder = self._remove_folder = None  # a later disk run makes a new folder

    def add(self, value: int) -> None:
        """Add one digest; call ``settle`` after a batch (runs are only merged there, so a
        batch checked with ``in_runs`` stays valid while it is being added)."""
        self._recent.add(value)

    def settle(self) -> None:
        if self._recent and len(self._recent) >= BUFFER_ENTRIES:
            run = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            run.sort()
            self._recent = set()
            self._runs.append(self._kept(run))
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                newer = self._runs.pop()
                older = self._runs.pop()
                self._runs.append(self._merged(older, newer))

    def __contains__(self, value: int) -> bool:
        if value in self._recent:
            return True
        return bool(self.in_runs(np.array([value], dtype=np.uint64))[0])

    def in_runs(self, values: np.ndarray) -> np.ndarray:
        """For each of ``values`` (uint64): whether it is in a sorted run (not the recent set)."""
        found = np.zeros(len(values), dtype=bool)
        for run in self._runs:
            found |= run.contains(values) if _on_disk(run) else _in_sorted(run, values)
        return found

    def contains_many(self, values: list[int]) -> list[bool]:
        """Membership of a batch, in order."""
        in_runs = self.in_runs(np.array(values, dtype=np.uint64))
        return [bool(hit) or value in self._recent for value, hit in zip(values, in_runs)]

    def _kept(self, run: np.ndarray):
        """A sorted run as it is kept: in memory, or written out when it is large."""
        if len(run) <= RAM_RUN_ENTRIES:
            return run
        return _write_run(self._new_path(), [run])

    def _merged(self, older, newer):
        if len(older) + len(newer) <= RAM_RUN_ENTRIES:
            merged = np.concatenate((_piece(older, 0, len(older)), _piece(newer, 0, len(newer))))
            del older, newer
            merged.sort()
            return merged
        merged = _write_run(self._new_path(), merge_chunks([older, newer], MERGE_CHUNK_ENTRIES))
        for run in (older, newer):
            if _on_disk(run):
                os.remove(run.path)
        return merged

    def _new_path(self) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="cutout-digests-", dir=tempfile.gettempdir())
            self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, True)
        self._files += 1
        return os.path.join(self._folder, f"run{self._files:06d}.u64")


def merge_chunks(runs: list[np.ndarray], chunk: int):
    """The entries of sorted ``runs``, in sorted order, a bounded piece at a time.

    Each round reads at most ``chunk`` entries of every run, cuts them all at the smallest of
    their last values (``searchsorted``), and yields that part sorted: nothing after the cut
    can be smaller, and the run whose window ended there moves a whole ``chunk`` on.
    """
    starts = [0] * len(runs)
    while True:
        windows = [(i, _piece(run, start, start + chunk)) for i, (run, start) in enumerate(zip(runs, starts))
                   if start < len(run)]
        if not windows:
            return
        cut = min(window[-1] for _, window in windows)
        parts = []
        for i, window in windows:
            taken = int(np.searchsorted(window, cut, side="right"))
            parts.append(window[:taken])
            starts[i] += taken
        out = np.concatenate(parts)
        out.sort(kind="stable")
        yield out


class _DiskRun:
    """A sorted run in a raw ``uint64`` file, memory-mapped, with each page's first entry in memory."""

    def __init__(self, path: str, fences: np.ndarray) -> None:
        self.path = path
        self.entries = np.memmap(path, dtype=np.uint64, mode="r")
        self.fences = fences  # entries[::PAGE_ENTRIES]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes

    def piece(self, start: int, stop: int) -> np.ndarray:
        """A copy of ``entries[start:stop]``; the pages read are handed back."""
        copy = np.array(self.entries[start:stop])
        self._release()
        return copy

    def contains(self, values: np.ndarray) -> np.ndarray:
        order = np.argsort(values)
        ordered = values[order]
        page = np.searchsorted(self.fences, ordered, side="right") - 1  # the only page a value can be on
        found = np.zeros(len(values), dtype=bool)
        pages = np.unique(page[page >= 0])
        for first in range(0, len(pages), LOOKUP_PAGES):
            group = pages[first:first + LOOKUP_PAGES]
            entries = self._pages(group)  # side by side, still one sorted array
            lo, hi = np.searchsorted(page, group[0], side="left"), np.searchsorted(page, group[-1], side="right")
            where = np.minimum(np.searchsorted(entries, ordered[lo:hi]), len(entries) - 1)
            found[order[lo:hi]] = entries[where] == ordered[lo:hi]
        return found

    def _pages(self, pages: np.ndarray) -> np.ndarray:
        """A copy of the entries on ``pages`` (sorted page numbers), in page order."""
        plain = self.entries.view(np.ndarray)
        full = len(plain) // PAGE_ENTRIES
        rows = plain[:full * PAGE_ENTRIES].reshape(full, PAGE_ENTRIES)[pages[pages < full]].ravel()
        if pages[-1] == full:  # the last, short page
            rows = np.concatenate((rows, plain[full * PAGE_ENTRIES:]))
        self._release()
        return rows

    def _release(self) -> None:
        """Drop the mapped pages from this process's memory (they stay in the page cache), so a
        run on disk never shows up as resident memory that grows with the job."""
        mapping = getattr(self.entries, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED)


def _write_run(path: str, chunks) -> _DiskRun:
    """Write sorted ``chunks`` to ``path`` one after the other, noting each page's first entry."""
    fences, written = [], 0
    with open(path, "wb") as out:
        for chunk in chunks:
            chunk.tofile(out)
            fences.append(chunk[(-written) % PAGE_ENTRIES::PAGE_ENTRIES].copy())  # not a view: frees the chunk
            written += len(chunk)
    return _DiskRun(path, np.concatenate(fences))


def _piece(run, start: int, stop: int) -> np.ndarray:
    return run.piece(start, stop) if _on_disk(run) else run[start:stop]


def _in_sorted(run: np.ndarray, values: np.ndarray) -> np.ndarray:
    where = np.searchsorted(run, values)
    inside = where < len(run)
    found = np.zeros(len(values), dtype=bool)
    found[inside] = run[where[inside]] == values[inside]
    return found


def _on_disk(run) -> bool:
    return isinstance(run, _DiskRun)
