"""Peak RSS of the measuring process itself, for benchmarks that run each phase in a child.

Why not ``ru_maxrss``: on Linux a child that Python's subprocess starts (vfork, then exec)
carries the parent's peak into its own ``ru_maxrss``, so a phase that used less than the
script that started it would report the script's peak. VmHWM starts afresh at exec.
"""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB (VmHWM; ``ru_maxrss`` where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
