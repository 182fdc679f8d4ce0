"""A set of 64-bit digests in about 8 bytes each, for the checks submit makes once per input.

Why not a Python ``set``: a set of 8-byte ``bytes`` costs about 70 bytes per entry (7 GB for
10^8 output keys). Here entries live in sorted numpy ``uint64`` runs, merged so that there are
only a few (each at least twice the size of the next), plus a small Python set of the newest
entries. Lookups of a whole batch are one ``searchsorted`` per run. Two different keys share a
digest with odds of about n²/2^65 (3 in 10,000 at 10^8 keys), as with the set of bytes before.
"""
from __future__ import annotations

import hashlib

import numpy as np

BUFFER_ENTRIES = 1 << 18  # newest entries kept in a Python set before they become a sorted run


def digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class DigestSet:
    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._runs: list[np.ndarray] = []  # sorted, largest first

    def __len__(self) -> int:  # counts an entry added twice twice (runs are not deduplicated)
        return len(self._recent) + sum(len(run) for run in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs) + 70 * len(self._recent)

    def add(self, value: int) -> None:
        """Add one digest; call ``settle`` after a batch (runs are only merged there, so a
        batch checked with ``in_runs`` stays valid while it is being added)."""
        self._recent.add(value)

    def settle(self) -> None:
        if len(self._recent) >= BUFFER_ENTRIES:
            run = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            run.sort()
            self._recent = set()
            self._runs.append(run)
            while len(self._runs) > 1 and len(self._runs[-2]) <= 2 * len(self._runs[-1]):
                newer = self._runs.pop()
                older = self._runs.pop()
                merged = np.concatenate((older, newer))
                del older, newer
                merged.sort()
                self._runs.append(merged)

    def __contains__(self, value: int) -> bool:
        if value in self._recent:
            return True
        return bool(self.in_runs(np.array([value], dtype=np.uint64))[0])

    def in_runs(self, values: np.ndarray) -> np.ndarray:
        """For each of ``values`` (uint64): whether it is in a sorted run (not the recent set)."""
        found = np.zeros(len(values), dtype=bool)
        for run in self._runs:
            where = np.searchsorted(run, values)
            inside = where < len(run)
            found[inside] |= run[where[inside]] == values[inside]
        return found

    def contains_many(self, values: list[int]) -> list[bool]:
        """Membership of a batch, in order."""
        in_runs = self.in_runs(np.array(values, dtype=np.uint64))
        return [bool(hit) or value in self._recent for value, hit in zip(values, in_runs)]
