"""Host memory policy for steps compiled for the CPU: keep the step's scratch memory mapped between steps.

XLA:CPU allocates a compiled step's temporary buffer with malloc at every execution (shakespeare_char's nanoGPT-
size step: 50 MB) and frees it at the end. glibc serves any allocation above its mmap threshold (at most 32 MB)
with a fresh mmap, so every step faulted in and zeroed ~12,000 new pages and unmapped them again: 11-12% of the
step's CPU time was spent in the kernel (perf, cpu-clock samples), on the step's critical path. Served from the
heap instead, and not trimmed back to the OS between steps, the same pages are reused by every step.

glibc only (Linux); elsewhere this does nothing. The cost: up to `trim` bytes of freed heap stay with the process.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 256 * 2**20  # freed memory at the top of the heap above this goes back to the OS


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def keep_step_memory(trim: int = TRIM_BYTES) -> bool:
    """Large allocations from the heap (no per-allocation mmap), and the heap trimmed only above `trim` bytes of
    free top memory. Process-wide; returns whether the policy is in force (False: not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, int(trim)) == 1
    if not ok:
        log.warning("mallopt refused the host memory policy; large step buffers stay mmapped per step")
    return ok
