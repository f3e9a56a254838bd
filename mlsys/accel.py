"""Which platform JAX runs on, said once at start-up, and whether an installed accelerator build went unused.

`pip install -e ".[cuda]"` (or `make run ACCEL=cuda`) installs JAX's CUDA plugin; on a machine where it cannot
start (no GPU, no driver) JAX quietly falls back to the CPU. A run that was meant for the GPU should say so at once,
not after an hour of CPU-speed steps.
"""

import logging
import os
from collections import Counter
from importlib import metadata

import jax

# Distributions that give JAX an accelerator backend, by the platform they provide.
PLUGINS = {"gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm7-plugin"), "tpu": ("libtpu",)}


def installed_plugins() -> dict[str, str]:
    """Accelerator distributions present in this environment: name -> version."""
    found = {}
    for names in PLUGINS.values():
        for name in names:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return found


def platform_report(backend: str, device_kinds: list[str], plugins: dict[str, str], jax_platforms: str | None,
                    gpu_visible: bool = False) -> tuple[str, str | None]:
    """(the start-up line naming the platform and devices, a warning when an accelerator went unused: a CUDA/TPU
    build installed, or an NVIDIA GPU visible without one). No warning when JAX_PLATFORMS asked for the CPU on
    purpose (the tests do)."""
    kinds = ", ".join(f"{n} x {kind}" for kind, n in Counter(device_kinds).items())
    line = f"JAX runs on {backend}: {kinds}" + (f" (JAX_PLATFORMS={jax_platforms})" if jax_platforms else "")
    if backend != "cpu" or (jax_platforms or "").strip().lower() == "cpu":
        return line, None
    unused = [f"{name} {version}" for name, version in plugins.items()]
    if not unused:
        return line, ("an NVIDIA GPU is visible but JAX has no CUDA build: pip install -e \".[cuda]\" (or make run "
                      "ACCEL=cuda)") if gpu_visible else None
    platform = next(p for p, names in PLUGINS.items() if any(u.split()[0] in names for u in unused))
    return line, (f"{', '.join(unused)} installed but JAX fell back to the CPU: no usable {platform} here (check "
                  f"the driver, e.g. nvidia-smi); JAX_PLATFORMS={'cuda' if platform == 'gpu' else platform} turns "
                  "this into an error")


def log_platform(log: logging.Logger) -> None:
    """Log which platform this process runs on, and warn when an accelerator build is installed but unused."""
    line, warning = platform_report(jax.default_backend(), [d.device_kind for d in jax.local_devices()],
                                    installed_plugins(), os.environ.get("JAX_PLATFORMS"),
                                    gpu_visible=os.path.exists("/dev/nvidiactl"))
    log.info(line)
    if warning:
        log.warning(warning)
