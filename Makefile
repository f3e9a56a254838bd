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

.PHONY: install run test clean bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.run +exp=$(EXP) $(ARGS)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest $(ARGS)

clean:
	rm -rf runs multirun outputs .pytest_cache

# Benchmarks (not part of CI: they need a quiet machine; the tests run every arm at a tiny size).
bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)
