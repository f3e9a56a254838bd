"""One persistent XLA compilation cache per test session, shared by every process of the session.

Many tests compile the same computations: the same tiny presets trained in-process by several tests, and again by
the `experiments.run` launches, servers and process groups they start. JAX reads JAX_COMPILATION_CACHE_DIR (and its
other jax_* settings) from the environment, so setting it in the process that starts the xdist workers, before they
start, gives the workers and every child they spawn the same cache: a computation is compiled once per session
and loaded everywhere else. The cache is fresh per session (a new temporary dir, removed at the end): no entry
written by other code, another jaxlib or another machine is ever read back.

A cache the environment already names (JAX_COMPILATION_CACHE_DIR) is used as it is and left alone: that is how the
xdist workers get their controller's. MLSYS_TEST_COMPILE_CACHE=0 runs a session without one (to measure what it
saves, or to rule it out).
"""

import os
import shutil
import tempfile

import jax

# Every compile is cached, however short: the tests' computations are tiny (most compile in well under jax's
# default threshold of 1 s), and it is those many small compiles, repeated across processes, that add up.
SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}

_created: list[str] = []


def start() -> None:
    """Create the session's cache; set it in the environment (inherited by workers and children) and in jax."""
    if os.environ.get("MLSYS_TEST_COMPILE_CACHE") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="mlsys-test-jax-cache-")
    _created.append(path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.update({name.upper(): str(value) for name, value in SETTINGS.items()})
    # jax read its environment when it was imported (conftest.py imports it first): this process needs them too.
    jax.config.update("jax_compilation_cache_dir", path)
    for name, value in SETTINGS.items():
        jax.config.update(name, value)


def stop() -> None:
    """Remove the cache this process created (none in an xdist worker: its controller's outlives it)."""
    while _created:
        shutil.rmtree(_created.pop(), ignore_errors=True)
