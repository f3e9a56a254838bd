"""The host memory policy of CPU steps (mlsys/hostmem.py): a large buffer freed and allocated again, as XLA:CPU
does with a step's scratch memory every step, reuses mapped pages instead of faulting in fresh ones."""

import ctypes
import json
import os
import resource
import subprocess
import sys

import pytest

from mlsys import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def measure() -> dict:
    """Faults per cycle under glibc's defaults, then under the policy; run in a fresh process (see the test)."""
    libc = hostmem._libc()
    if libc is None:
        return {}
    libc.mallopt(hostmem._M_MMAP_MAX, 65536)  # glibc's defaults: every cycle maps and faults the buffer anew
    libc.mallopt(hostmem._M_TRIM_THRESHOLD, 128 * 1024)
    default = faults_per_cycle(libc)
    ok = hostmem.keep_step_memory()
    return {"default": default, "ok": ok, "kept": faults_per_cycle(libc), "pages": SIZE // resource.getpagesize()}


def test_step_sized_buffers_reuse_their_pages():
    # In a fresh process: a worker that already trained under the policy holds large free chunks inside its heap,
    # and a SIZE malloc served from one of them faults nothing even under the defaults (the measured "default" was 0).
    out = subprocess.run([sys.executable, "-c", "import json; from tests.test_hostmem import measure; "
                          "print(json.dumps(measure()))"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if not r:
        pytest.skip("mallopt is glibc's")
    assert r["ok"]
    assert r["default"] > 0.5 * r["pages"], r
    assert r["kept"] < 0.05 * r["pages"], r
