"""Keep the C heap near what the daemon uses: few malloc arenas, and their free memory handed back to
the OS when the daemon has no session left.

glibc gives each thread that allocates an arena of its own (up to 8 a core), and each arena keeps
what its threads freed, fragmented, for the next allocation: after a 3-minute soak a daemon with
every session closed held +64 MiB of anonymous memory, +29 MiB with two arenas (bench/results/
cpu-2026-12-03-soak.md), the usual remedy for many-threaded servers (MALLOC_ARENA_MAX=2). The daemon's
threads allocate little but tensors, which on the CPU are its KV slabs; on CUDA they live on the device.
malloc_trim(0) returns the free pages of every arena; it costs a few milliseconds, so it runs only
when the last session closes.
"""

import ctypes
import ctypes.util
import logging
import os
import time

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter
ARENAS = 2

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim, _mallopt = _libc.malloc_trim, _libc.mallopt
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
    _trim = _mallopt = None


def limit_arenas() -> bool:
    """At most ARENAS malloc arenas for the threads started from now on, unless MALLOC_ARENA_MAX says
    otherwise; whether it was set."""
    if _mallopt is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_mallopt(M_ARENA_MAX, ARENAS))


def trim() -> float | None:
    """malloc_trim(0) where the C library has it: the seconds it took, else None."""
    if _trim is None:
        return None
    t0 = time.perf_counter()
    _trim(0)
    took = time.perf_counter() - t0
    log.debug("malloc_trim(0) took %.1f ms", took * 1000)
    return took
