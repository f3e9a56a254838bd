"""Fault injection with real processes: SIGKILL at random moments (some during asynchronous checkpoint writes),
resumed each time, ends bit-identical to an uninterrupted run; and disk faults (a checkpoint dir that cannot be
written, a full disk) stop with a clear error and leave the last good checkpoint as it was."""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mlsys import checkpoint, data
from mlsys.parallel import make_mesh
from mlsys.train.build import build
from tests.conftest import ROOT, tiny, typed_cfg

KILLS = 24  # the issue asks for >= 20
STEPS = 600
ARGS = ["+exp=digits_mlp", "logger=jsonl", "trainer.progress=false", f"trainer.steps={STEPS}", "trainer.log_every=5",
        "trainer.ckpt_every=5", "trainer.eval_every=0", "model.hidden=[16]", "trainer.resume=auto"]
TMP = ".orbax-checkpoint-tmp"


# Writes past N bytes fail with EFBIG, as on a full disk they fail with ENOSPC (Python ignores SIGXFSZ). Set in a
# wrapper that then execs the trainer: no Python code runs between fork and exec in this multithreaded process.
LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


def launch(run_dir, tmp_path, *extra, args=ARGS, cache=True, file_size_limit=None):
    # One device: the fastest start; the restore checks below reshard onto the test process's devices anyway.
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "WANDB_MODE": "offline"}
    args = [*args, f"hydra.run.dir={run_dir}", f"trainer.compile_cache={tmp_path / 'jax_cache' if cache else ''}",
            *extra]
    err = open(tmp_path / "stderr.log", "a")
    limit = [sys.executable, "-c", LIMITED, str(file_size_limit)] if file_size_limit else [sys.executable]
    return subprocess.Popen([*limit, "-m", "experiments.run", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)


def entries(run_dir) -> tuple[list[int], list[str]]:
    """(finalized steps, unfinished temporary step dirs) in the run's checkpoints dir."""
    try:
        names = os.listdir(os.path.join(run_dir, "checkpoints"))
    except FileNotFoundError:
        return [], []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP in n)


class Restorer:
    """Restores a run dir's newest checkpoint in this process, as a resuming run would."""

    def __init__(self, args=ARGS):
        self.cfg = typed_cfg(tiny(None, *args[1:]))
        self.mesh = make_mesh(self.cfg.mesh)
        self.dataset = data.load(self.cfg.data, self.cfg.seed)
        run = build(self.cfg, self.dataset.spec, self.mesh, self.cfg.trainer.steps)
        self.abstract = checkpoint.abstract_like(run.state, run.shardings)

    def __call__(self, run_dir, step=None):
        it = data.train_iterator(self.dataset.splits["train"], self.cfg.data.batch_size, self.cfg.seed)
        state, step = checkpoint.restore(str(run_dir), self.abstract, it, step=step)
        return state, step, it.get_state()


def same(a, b) -> bool:
    """Bit-identical trees, not close ones (RNG keys compared by their data)."""
    def raw(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(raw(x), raw(y)) for x, y in zip(la, lb))


def wait_for(pred, proc, timeout=120.0, poll=0.003):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if pred():
            return True
        time.sleep(poll)
    return False


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    rng = random.Random(1234)
    restorer = Restorer()
    faulted = tmp_path / "faulted"
    kills, during_write, incomplete_seen = 0, 0, set()
    while kills < KILLS:
        start = max(entries(faulted)[0], default=0)
        proc = launch(faulted, tmp_path)
        mode = rng.choice(["write", "write", "random", "anytime"])
        if mode == "write":  # the moment the k-th new checkpoint's temporary dir appears: mid asynchronous write
            k = rng.randint(1, 3)
            wait_for(lambda: any(int(n.split(".")[0]) >= start + 5 * k for n in entries(faulted)[1]), proc)
        elif mode == "random":  # a random moment once training has made progress
            wait_for(lambda: max(entries(faulted)[0], default=0) > start, proc)
            time.sleep(rng.uniform(0, 0.4))
        else:  # any moment from launch: start-up, restore, compilation, training
            time.sleep(rng.uniform(0, 6))
        if proc.poll() is not None:  # it finished (or failed) before the kill landed
            assert proc.returncode == 0, (tmp_path / "stderr.log").read_text()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        steps, tmps = entries(faulted)
        during_write += bool(tmps)
        incomplete_seen.update(tmps)
        if steps:  # never left unable to resume: the newest finished step restores, the unfinished are skipped
            _, restored, _ = restorer(faulted)
            assert restored == steps[-1] and all(int(n.split(".")[0]) > restored for n in tmps), (steps, tmps)
    assert kills >= 20, f"the run finished after only {kills} kills; raise STEPS"
    assert during_write >= 5, f"only {during_write} kills landed during a checkpoint write"

    final = launch(faulted, tmp_path)
    assert final.wait(timeout=300) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    assert entries(faulted)[1] == []  # the run that finished left no temporary dirs behind
    # Uninterrupted, no saves between; resume=null, or auto would continue from the sibling run dir.
    reference = launch(tmp_path / "reference", tmp_path, "trainer.ckpt_every=0", "trainer.resume=null")
    assert reference.wait(timeout=300) == 0, (tmp_path / "stderr.log").read_text()[-3000:]

    a, step_a, data_a = restorer(faulted)
    b, step_b, data_b = restorer(tmp_path / "reference")
    assert step_a == step_b == STEPS and data_a == data_b
    assert same(a, b)  # params, optimizer state, step, RNG streams: bit-identical
    print(f"\nSIGKILL: {kills} kills survived, {during_write} during a checkpoint write, "
          f"{len(incomplete_seen)} unfinished step dirs skipped")


# --- Disk faults. Bigger parameters than above, so that a checkpoint is far larger than the logs and configs.
DISK = [*ARGS[:-2], "model.hidden=[512]", "trainer.log_every=10", "trainer.ckpt_every=10", "trainer.resume=auto"]


def files(directory) -> dict:
    return {os.path.relpath(os.path.join(r, f), directory): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(directory) for f in fs}


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (a real ENOSPC when full); needs root and a kernel that lets this container mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or not permitted)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fault", ["file_size_limit", "full_tmpfs"])
def test_full_disk_mid_run_is_a_clear_error_and_the_last_good_checkpoint_is_untouched(tmp_path, request, fault):
    run_dir = (request.getfixturevalue("small_disk") if fault == "full_tmpfs" else tmp_path) / "run"
    first = launch(run_dir, tmp_path, "trainer.steps=10", args=DISK, cache=False)
    assert first.wait(timeout=300) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    good = files(run_dir / "checkpoints" / "10")
    restorer = Restorer(DISK)
    before = restorer(run_dir)
    limit = None
    if fault == "full_tmpfs":  # fill the disk, leaving room for logs but not for another checkpoint
        free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
        (run_dir.parent / "filler").write_bytes(bytes(free - 128 * 1024))
    else:  # below the 128 KiB of the 64x512 kernel alone: every new step fails, however orbax splits its files
        limit = 100 * 1024
    full = launch(run_dir, tmp_path, "trainer.steps=30", args=DISK, cache=False, file_size_limit=limit)
    assert full.wait(timeout=300) == 2
    err = (tmp_path / "stderr.log").read_text()
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    reason = "No space left on device" if fault == "full_tmpfs" else "File too large"
    assert line.startswith(f"error: cannot write checkpoint step 20 in {run_dir / 'checkpoints'} ({reason}")
    assert "the last good checkpoint, step 10, is untouched" in line
    assert files(run_dir / "checkpoints" / "10") == good  # byte for byte
    after = restorer(run_dir)
    assert after[1] == 10 and same(after[0], before[0]) and after[2] == before[2]
    if fault == "full_tmpfs":
        (run_dir.parent / "filler").unlink()
    again = launch(run_dir, tmp_path, "trainer.steps=30", args=DISK, cache=False)  # space again: it continues
    assert again.wait(timeout=300) == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    assert entries(run_dir)[0][-1] == 30


def test_checkpoint_dir_that_cannot_be_created_fails_before_training(tmp_path):
    """Works as root too (CI), where permission bits do not stop writes: `checkpoints` is a regular file. The
    command runs in this process (tests/entry.py): it stops before any training, so a process start would be most of
    its cost."""
    from tests.entry import run_main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a directory")
    code, _, err = run_main("experiments.run", [*DISK, f"hydra.run.dir={tmp_path / 'run'}", "trainer.compile_cache=",
                                                "trainer.steps=10"], tmp_path)
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint dir {tmp_path / 'run' / 'checkpoints'} is not writable (File exists")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_checkpoint_dir_fails_before_training(train_tiny, tmp_path):
    from mlsys.errors import CheckpointError

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    os.chmod(tmp_path / "run" / "checkpoints", 0o555)
    with pytest.raises(CheckpointError, match=r"checkpoints is not writable \(Permission denied"):
        train_tiny("digits_mlp", run_dir=tmp_path / "run")
