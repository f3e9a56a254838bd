"""The command line as a user meets it: real processes, the run dir layout, and every bad input's message. The bad
inputs stop before any training: they run the same `python -m experiments.run` in this process (tests/entry.py),
which skips the seconds each new interpreter spends importing jax and friends; one still starts a real process."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.entry import run_main

FAST = ["logger=jsonl", "trainer.progress=false"]


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_run_dir_layout_and_summary(tmp_path):
    args = ["+exp=digits_mlp", *FAST, "trainer.steps=20", "trainer.log_every=10", "model.hidden=[16]"]
    first, second = run_cli(args, tmp_path), run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    last = first.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"run dir: (runs/digits_mlp/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6})", last)
    assert m, last
    run_dir = tmp_path / m.group(1)
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl", "env.json", "checkpoints/20"):
        assert (run_dir / name).exists(), name
    assert "model.hidden=[16]" in (run_dir / ".hydra/overrides.yaml").read_text()
    assert "test   loss" in first.stdout
    assert second.returncode == 0
    assert second.stdout.strip().splitlines()[-1] != last  # two runs never share a dir


BAD = [
    (["trainer.stepz=5"], "trainer.stepz"),
    (["optim.lr=fast"], "optim.lr"),
    (["model=densenet"], "Could not find 'model/densenet'"),  # a family mlsys does not have
    (["+exp=nope"], "Available options in 'exp'"),
    (["optim.name=adagrad"], "optim.name='adagrad': must be one of ['adamw', 'sgd']"),
    (["optim.lr=0"], "optim.lr=0.0: must be > 0"),
    (["trainer.steps=-1"], "trainer.steps=-1: must be > 0"),
    (["mesh=data", "data.batch_size=30"], "data.batch_size=30: must be divisible by the data-parallel size 8"),
    (["mesh.shape={data:16}"], "needs 16 devices but only 8 exist"),
    (["+exp=shakespeare_char", "data.path=/no/such/file.txt"], "data.path='/no/such/file.txt': cannot read it"),
    (["+exp=shakespeare_char", "data.seq_len=128"], "data.seq_len=128: is above the model's maximum"),
    (["trainer.resume=/no/such/run"], "trainer.resume='/no/such/run': no such directory"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    code, out, err = run_main("experiments.run", [*FAST, *args], tmp_path)
    assert code != 0
    assert message in err + out, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoints"))


def test_text_file_that_is_not_utf8(tmp_path):
    """A real process: a user error exits 2 with one line, no traceback, from the interpreter's own start."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("déjà vu ".encode("latin-1") * 200)
    out = run_cli([*FAST, "+exp=shakespeare_char", f"data.path={bad}"], tmp_path, timeout=120)
    assert out.returncode == 2 and "is not UTF-8" in out.stderr and "Traceback" not in out.stderr


def test_sigterm_saves_and_stops_then_auto_resume_continues(tmp_path):
    """Preemption as a cluster does it: SIGTERM mid-run → the step finishes, a checkpoint is written, exit 75."""
    import json
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    args = ["+exp=digits_mlp", *FAST, "trainer.steps=1000000", "trainer.log_every=10", "model.hidden=[16]",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "preempted: stopped by SIGTERM after step" in err and "Traceback" not in err
    saved = int(re.search(r"after step (\d+)", err).group(1))
    assert (tmp_path / "run" / "checkpoints" / str(saved)).is_dir()
    again = run_cli(["+exp=digits_mlp", *FAST, f"trainer.steps={saved + 10}", "trainer.log_every=10",
                     "model.hidden=[16]", "trainer.resume=auto", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.load(open(tmp_path / "run" / "env.json"))["start_step"] == saved
