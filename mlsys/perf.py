"""Speed accounting: peak FLOP/s by device kind, model FLOPs utilisation (MFU), the compilation cache."""

import functools
import os
import time

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache

# Dense bf16 peak TFLOP/s per chip (vendor figures; MFU conventionally divides by the bf16 peak whatever the
# compute dtype). Matched as substrings of jax's device_kind, first match wins.
PEAK_TFLOPS = {
    "h200": 989.0, "h100": 989.0, "gh200": 989.0, "b200": 2250.0, "a100": 312.0, "l40s": 362.0, "l4": 121.0,
    "a10g": 125.0, "v100": 125.0,
    "tpu v6": 918.0, "tpu v5p": 459.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v4": 275.0,
}


@functools.cache
def measured_cpu_tflops() -> float:
    """CPUs have no table entry: the achieved float32 FLOP/s of a 1024x1024 matmul, measured once per process.
    1024 already saturates a CPU's FMA units (2048 measured the same rate at 8x the cost, about 100 GFLOP paid in
    every training process); about 13 GFLOP now."""
    n = 1024
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
        y = f(x)
    y.block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e12


def peak_tflops(device_kind: str, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of one device, where the figure comes from); `override` (trainer.peak_tflops) wins."""
    if override is not None:
        return override, "trainer.peak_tflops"
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS.items():
        if key in kind:
            return value, f"table ({key})"
    return measured_cpu_tflops(), "measured float32 matmul"


def enable_compile_cache(path: str) -> None:
    """A persistent compilation cache shared by every run on this machine: a second launch of the same
    experiment loads its executables instead of compiling them."""
    if not path:
        return
    path = os.path.expanduser(path)
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, path):
        # Another cache (JAX_COMPILATION_CACHE_DIR in the environment, an earlier run in this process) may be open
        # already, and jax keeps the one it opened first: this run's setting wins.
        compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
