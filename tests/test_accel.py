"""Accelerators: the install line per ACCEL, the platform said at start-up, an unused CUDA/TPU build called out."""

import logging
import re
import subprocess

import pytest

from mlsys.accel import log_platform, platform_report
from tests.conftest import ROOT


def make_dry(*args):
    return subprocess.run(["make", "-n", *args, "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("accel", ["cpu", "cuda", "tpu"])
def test_make_installs_the_accelerator_extra(accel):
    out = make_dry("install", f"ACCEL={accel}")
    assert out.returncode == 0 and f".installed-{accel}" in out.stdout, out.stderr
    (extras,) = set(re.findall(r'-e "\.\[([^\]]*)\]"', out.stdout))  # uv's line and pip's fallback agree
    extras = extras.split(",")
    assert {"dev", "sweep"} <= set(extras)  # the CPU set (the sweep extra among it) in every case
    assert [e for e in extras if e in ("cuda", "tpu")] == ([] if accel == "cpu" else [accel])


def test_make_refuses_an_unknown_accel():
    out = make_dry("run", "ACCEL=rocm")
    assert out.returncode != 0
    assert "ACCEL=rocm: must be one of cpu, cuda, tpu (e.g. make run ACCEL=cuda)" in out.stderr.strip().splitlines()[-1]


def test_platform_line_and_unused_accelerator_warnings():
    line, warn = platform_report("gpu", ["NVIDIA H200"] * 8, {"jax-cuda12-plugin": "0.10.2"}, None)
    assert line == "JAX runs on gpu: 8 x NVIDIA H200" and warn is None
    # The CUDA extra installed on a machine without a usable GPU: JAX fell back to the CPU.
    line, warn = platform_report("cpu", ["cpu"], {"jax-cuda12-plugin": "0.10.2"}, None)
    assert line == "JAX runs on cpu: 1 x cpu"
    assert warn.startswith("jax-cuda12-plugin 0.10.2 installed but JAX fell back to the CPU: no usable gpu here")
    assert "JAX_PLATFORMS=cuda turns this into an error" in warn
    _, warn = platform_report("cpu", ["cpu"], {"libtpu": "0.0.42"}, None)
    assert "no usable tpu here" in warn and "JAX_PLATFORMS=tpu" in warn
    # Asked for the CPU on purpose (the tests do): no warning. A GPU without the CUDA build: the install line.
    assert platform_report("cpu", ["cpu"] * 8, {"jax-cuda12-plugin": "0.10.2"}, "cpu")[1] is None
    _, warn = platform_report("cpu", ["cpu"], {}, None, gpu_visible=True)
    assert warn == 'an NVIDIA GPU is visible but JAX has no CUDA build: pip install -e ".[cuda]" (or make run ACCEL=cuda)'
    assert platform_report("cpu", ["cpu"], {}, None)[1] is None


def test_start_up_logs_the_platform(caplog):
    with caplog.at_level(logging.INFO, logger="mlsys"):
        log_platform(logging.getLogger("mlsys"))
    assert caplog.messages[0] == "JAX runs on cpu: 8 x cpu (JAX_PLATFORMS=cpu)"
