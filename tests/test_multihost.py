"""Several processes on 127.0.0.1: 2 processes x 4 devices give the numbers of 1 process x 8 devices, through a
checkpoint and a resume. Real processes, real jax.distributed, gloo collectives."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ARGS = ["+exp=digits_mlp", "logger=jsonl", "trainer.progress=false", "model.hidden=[32]", "mesh.shape={data:2,fsdp:4}",
        "data.batch_size=32", "trainer.log_every=5", "trainer.ckpt_every=10", "trainer.eval_every=0"]


def run(cmd, cwd, devices):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return os.path.join(cwd, re.search(r"^run dir: (\S+)$", out.stdout, re.M).group(1))


def losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


@pytest.mark.slow
def test_two_processes_match_one_through_save_and_resume(tmp_path):
    one = run(["experiments.run", *ARGS, "trainer.steps=20"], tmp_path, devices=8)
    two = run(["experiments.launch_local", "-n", "2", "-d", "4", "--", *ARGS, "trainer.steps=10"], tmp_path, 4)
    env = json.load(open(os.path.join(two, "env.json")))
    assert env["process_count"] == 2 and env["local_device_count"] == 4 and env["device_count"] == 8
    assert sorted(os.listdir(os.path.join(two, "checkpoints", "10", "data"))) == ["process_0-of-2.json",
                                                                                  "process_1-of-2.json"]
    resumed = run(["experiments.launch_local", "-n", "2", "-d", "4", "--", *ARGS, "trainer.steps=20",
                   f"trainer.resume={two}"], tmp_path, 4)
    want, got = losses(one), {**losses(two), **losses(resumed)}
    assert sorted(got) == sorted(want) == [5, 10, 15, 20]
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])
    # only one run dir per launch: process 1 writes into process 0's
    assert len(os.listdir(os.path.dirname(one))) == 3
