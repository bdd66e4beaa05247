"""Peak-memory checks for tests that feed promptus hostile files.

``with bounded_memory() as m: ...`` measures how far the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) rose above its resident set at entry, in
MiB, into ``m.peak_mb``. An address-space ceiling (RLIMIT_AS) of ``ceiling_mb`` above
the current size holds meanwhile, so that a runaway allocation fails inside the test
(MemoryError, or torch's RuntimeError) instead of taking the machine's memory.
Linux only; elsewhere the tests that use it are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import resource
from dataclasses import dataclass

import pytest

#: The promise of the Safety section: any file under 1 MB costs less than this.
LIMIT_MB = 500


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    # Free heap pages go back to the system first: otherwise an allocation could reuse
    # them without raising the resident set, and the measured peak would be too low.
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5": reset the peak resident set size to the current one


@dataclass
class Peak:
    peak_mb: float = 0.0


@contextlib.contextmanager
def bounded_memory(ceiling_mb: int = 2048):
    try:
        _reset_peak()
        start = _status_mb("VmRSS")
        size = _status_mb("VmSize")
    except (OSError, KeyError) as e:
        pytest.skip(f"peak-memory measurement needs Linux's /proc/self/clear_refs and status ({e})")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    ceiling = int((size + ceiling_mb) * 2**20)
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    peak = Peak()
    try:
        yield peak
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        peak.peak_mb = _status_mb("VmHWM") - start
