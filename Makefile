# Two commands do all the set-up: `make run` and `make test` create .venv when it is missing and install the
# project with the pinned set in constraints.txt. A second call skips the install (the stamp below is newer
# than pyproject.toml and constraints.txt, one stamp per ACCEL).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# ACCEL=cuda or ACCEL=tpu adds JAX's CUDA 12 / TPU build to the install (the `cuda`/`tpu` extras).
ACCEL ?= cpu
ifeq ($(filter $(ACCEL),cpu cuda tpu),)
$(error ACCEL=$(ACCEL): must be one of cpu, cuda, tpu (e.g. make run ACCEL=cuda))
endif
comma := ,
EXTRAS := dev,bench,export,serve,track,sweep,lm,data,hf$(if $(filter-out cpu,$(ACCEL)),$(comma)$(ACCEL))
STAMP := $(VENV)/.installed-$(ACCEL)
EXP ?= digits_mlp
ARGS ?=
# Tests simulate 8 devices on the CPU.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# Processes write their .pyc files (an environment setting PYTHONDONTWRITEBYTECODE=1 makes every test process
# compile its imports from source: tests/conftest.py drops it for the processes the tests start, this for pytest).
unexport PYTHONDONTWRITEBYTECODE
# pytest-xdist workers for `make test`: much of the suite waits on subprocesses (training runs, servers, process
# groups), so 3 workers keep 2 cores busy; tests/conftest.py keeps a module's shared fixtures on one worker.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 3

.PHONY: install run test clean bench

# uv installs the same pinned set as pip several times faster (a fresh venv: 157 s against 1304 s, loaded machine);
# it gets pip's configured sources from .ci/pip_sources.py. Where uv cannot be had, pip installs as before.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	($(PY) -m pip install -q uv -c constraints.txt && \
	  $(PY) -m uv pip install -q --python $(PY) $$($(PY) .ci/pip_sources.py) -e ".[$(EXTRAS)]" -c constraints.txt) || \
	($(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e ".[$(EXTRAS)]" -c constraints.txt)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.run +exp=$(EXP) $(ARGS)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

clean:
	rm -rf runs multirun outputs .pytest_cache

# Benchmarks (not part of CI: they need a quiet machine; the tests run every arm at a tiny size).
bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)
