"""Several processes on 127.0.0.1: 2 processes x 4 devices give the numbers of 1 process x 8 devices, and their
checkpoints travel: a run saved by 2 processes resumes, exports, fine-tunes and reruns in 1 process, and one saved
by 1 process resumes in 2. Real processes, real jax.distributed, gloo collectives."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import ROOT, typed_cfg

ARGS = ["+exp=digits_mlp", "logger=jsonl", "trainer.progress=false", "model.hidden=[32]", "mesh.shape={data:2,fsdp:4}",
        "data.batch_size=32", "trainer.log_every=5", "trainer.ckpt_every=10", "trainer.eval_every=0"]
TWO = ["experiments.launch_local", "-n", "2", "-d", "4", "--"]


def run(cmd, cwd, devices):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return os.path.join(cwd, re.search(r"^run dir: (\S+)$", out.stdout, re.M).group(1))


def metrics(run_dir, split="train"):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == split}


def assert_close(got: dict, want: dict, tol=1e-5):
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= tol, (step, got[step], want[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x 8 devices for 20 steps (the reference), and 2 processes x 4 devices for 10 steps."""
    cwd = tmp_path_factory.mktemp("multihost")
    one = run(["experiments.run", *ARGS, "trainer.steps=20"], cwd, devices=8)
    two = run([*TWO, *ARGS, "trainer.steps=10"], cwd, devices=4)
    env = json.load(open(os.path.join(two, "env.json")))
    assert env["process_count"] == 2 and env["local_device_count"] == 4 and env["device_count"] == 8
    assert len(os.listdir(os.path.dirname(one))) == 2  # one run dir per launch: process 1 writes into process 0's
    return cwd, one, two


@pytest.mark.slow
def test_resume_on_another_process_count_continues_the_uninterrupted_run(runs):
    cwd, one, two = runs
    want = metrics(one)
    # 2 processes x 4 devices → 1 process x 8 devices
    in_one = run(["experiments.run", *ARGS, "trainer.steps=20", f"trainer.resume={two}"], cwd, devices=8)
    assert_close({**metrics(two), **metrics(in_one)}, want)
    # 1 process → 2 processes, from the reference run as it was at step 10
    at_10 = os.path.join(cwd, "one_at_step_10")
    shutil.copytree(one, at_10)
    shutil.rmtree(os.path.join(at_10, "checkpoints", "20"))
    in_two = run([*TWO, *ARGS, "trainer.steps=20", f"trainer.resume={at_10}"], cwd, devices=4)
    assert json.load(open(os.path.join(in_two, "env.json")))["start_step"] == 10
    assert_close(metrics(in_two), {s: v for s, v in want.items() if s > 10})


@pytest.mark.slow
def test_a_two_process_run_exports_fine_tunes_and_reruns_in_one_process(runs):
    from mlsys import data
    from mlsys.export.pipeline import export_run
    from mlsys.export.restore import load_run
    from mlsys.parallel import make_mesh
    from mlsys.train.build import build
    from mlsys.train.pretrained import load_pretrained

    cwd, _, two = runs
    # Export: the weights load onto one device of this one process; its test loss is what the 2 processes logged.
    loaded = load_run(two)
    assert loaded.step == 10
    test = loaded.dataset.splits["test"]
    logits = loaded.model(jax.numpy.asarray(test.inputs))
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(test.targets)).mean())
    assert abs(loss - metrics(two, "test")[10]) <= 1e-5
    manifest = json.load(open(os.path.join(export_run(two, formats=("onnx",)), "manifest.json")))
    assert manifest["source"]["step"] == 10 and manifest["parity"]["onnx_max_abs_diff"] <= 1e-4
    # init_from: the fine-tune starts from exactly those weights, on this process's own 8-device mesh.
    cfg = typed_cfg(ARGS + [f"trainer.init_from={two}"])
    mesh = make_mesh(cfg.mesh)
    fresh = build(cfg, loaded.dataset.spec, mesh, 10).state
    state, step = load_pretrained(two, cfg, loaded.dataset.spec, fresh, mesh)
    assert step == 10
    jax.tree.map(np.testing.assert_array_equal, nnx.state(loaded.model, nnx.Param), state.params)
    # rerun: the recorded config in one process (its dist.* settings dropped) gives the same losses.
    again = run(["experiments.rerun", two], cwd, devices=8)
    assert json.load(open(os.path.join(again, "env.json")))["process_count"] == 1
    assert_close(metrics(again), metrics(two))
