"""Hand the C heap's free memory back to the OS when the daemon has no session left.

glibc keeps memory freed by the many RPC and session threads in its arenas (and their free pages
resident) for the next allocation: after a load, a daemon with every session closed held ~30 MiB
more than it needs (bench/results/cpu-2026-12-02-soak-2.md). malloc_trim(0) returns the free pages
of every arena; it costs a few milliseconds, so it runs only when the last session closes.
"""

import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)

try:
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
    _trim = None


def trim() -> float | None:
    """malloc_trim(0) where the C library has it: the seconds it took, else None."""
    if _trim is None:
        return None
    t0 = time.perf_counter()
    _trim(0)
    took = time.perf_counter() - t0
    log.debug("malloc_trim(0) took %.1f ms", took * 1000)
    return took
