"""Preemption with several processes: SIGTERM reaches only one of them, yet all save the same step and stop."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from mlsys.launch import free_port
from tests.conftest import ROOT

ARGS = ["+exp=digits_mlp", "logger=jsonl", "trainer.progress=false", "model.hidden=[16]", "mesh.shape={data:2}",
        "data.batch_size=16", "trainer.steps=1000000", "trainer.log_every=10", "trainer.eval_every=0"]


def test_sigterm_to_one_process_stops_all_at_an_agreed_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WANDB_MODE": "offline"}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.run", *ARGS, f"hydra.run.dir={tmp_path / f'run{i}'}",
                               "dist.num_processes=2", f"dist.process_id={i}", f"dist.coordinator=127.0.0.1:{port}"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        metrics = tmp_path / "run0" / "metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # process 0 is not told: it learns at the next log step
        errs = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [75, 75], errs[0][-2000:] + errs[1][-2000:]
    steps = [int(re.search(r"preempted: stopped by SIGTERM after step (\d+)", e).group(1)) for e in errs]
    assert steps[0] == steps[1] and steps[0] % 10 == 0  # agreed, at a log step
    saved = tmp_path / "run0" / "checkpoints" / str(steps[0])
    position = json.loads((saved / "data_position" / "metadata").read_text())  # one, for any process count
    assert position["next_batch"] == steps[0] and position["process_count"] == 2
    cost = json.load(open(tmp_path / "run0" / "env.json"))["cost"]  # what the run cost until it was stopped
    assert cost["preempted"] and cost["devices"] == 2 and cost["examples"] == steps[0] * 16
