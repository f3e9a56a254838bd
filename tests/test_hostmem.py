"""The host memory policy of CPU steps (mlsys/hostmem.py): a large buffer freed and allocated again, as XLA:CPU
does with a step's scratch memory every step, reuses mapped pages instead of faulting in fresh ones."""

import ctypes
import resource

import pytest

from mlsys import hostmem

SIZE = 48 * 2**20  # above glibc's largest mmap threshold (32 MB): mmapped per allocation by default


def faults_per_cycle(libc, cycles: int = 4) -> float:
    """Minor page faults per malloc / touch every page / free cycle of SIZE bytes, after one warm-up cycle."""
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def cycle():
        p = libc.malloc(SIZE)
        ctypes.memset(p, 1, SIZE)
        libc.free(p)

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / cycles


def test_step_sized_buffers_reuse_their_pages():
    libc = hostmem._libc()
    if libc is None:
        pytest.skip("mallopt is glibc's")
    pages = SIZE // resource.getpagesize()
    libc.mallopt(hostmem._M_MMAP_MAX, 65536)  # glibc's defaults: every cycle maps and faults the buffer anew
    libc.mallopt(hostmem._M_TRIM_THRESHOLD, 128 * 1024)
    default = faults_per_cycle(libc)
    assert hostmem.keep_step_memory()
    kept = faults_per_cycle(libc)
    assert default > 0.5 * pages, default
    assert kept < 0.05 * pages, kept
