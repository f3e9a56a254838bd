"""End to end, in-process: each preset trains (tiny), writes its run dir, resumes exactly, fails clearly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from mlsys import checkpoint
from mlsys.errors import CheckpointError, NonFiniteError
from tests.conftest import BASE, CORPUS_PRESETS, PRESETS, TRAINED_ELSEWHERE


def metrics(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.parametrize("exp", [p for p in PRESETS if p not in TRAINED_ELSEWHERE])
def test_each_preset_trains_end_to_end(train_tiny, shared_run, exp):
    # The plain tiny run is the session's shared one (other files' tests read it too); it is only read here.
    results, run_dir = (train_tiny if exp in BASE or exp in CORPUS_PRESETS else shared_run)(exp)
    rows = metrics(run_dir)
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    assert {"step", "split", "loss", "accuracy", "grad_norm", "lr", "step_time_ms", "examples_per_s"} <= set(rows[0])
    assert "val" in results and np.isfinite(results["val"]["loss"])
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["packages"]["jax"] == jax.__version__ and env["process_count"] == 1 and "git" in env
    assert env["devices"] and env["device_count"] == 8
    assert checkpoint.has_checkpoint(run_dir)
    if exp == "shakespeare_char":
        assert len(results["sample"]) == 20
        assert json.load(open(os.path.join(run_dir, "vocab.json")))["level"] == "char"


@pytest.mark.parametrize("cached", [False, True])
def test_end_of_run_sample_uses_the_cache_only_when_long(train_tiny, monkeypatch, cached):
    """A short end-of-run sample (sample length x block under loop.UNCACHED_SAMPLE_TOKENS) is drawn without the KV
    cache, which compiles one small graph; a long one with it. Either way the run prints a sample of that length."""
    from mlsys import generate
    from mlsys.train import loop

    used = []
    real = generate.generate
    monkeypatch.setattr(generate, "generate", lambda *a, **kw: used.append(kw["cached"]) or real(*a, **kw))
    monkeypatch.setattr(loop, "UNCACHED_SAMPLE_TOKENS", 0 if cached else 10**9)
    results, _ = train_tiny("shakespeare_char", "trainer.steps=2", "data.eval_batches=1")
    assert used == [cached] and len(results["sample"]) == 20


def test_training_lowers_the_loss(train_tiny):
    results, run_dir = train_tiny("digits_mlp", "trainer.steps=100", "trainer.log_every=20",
                                  "optim.warmup_steps=10", "model.hidden=[128]")
    rows = metrics(run_dir)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"] and results["test"]["accuracy"] > 0.8


def test_data_parallel_mesh_matches_one_device(train_tiny, shared_run, tmp_path):
    one, _ = shared_run("digits_mlp")
    eight, run_dir = train_tiny("digits_mlp", "mesh=data", run_dir=tmp_path / "eight")
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["mesh"]["data"] == 8
    np.testing.assert_allclose(eight["train"]["loss"], one["train"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(eight["val"]["loss"], one["val"]["loss"], rtol=1e-5)


@pytest.mark.parametrize("exp", ["digits_cnn", "shakespeare_char"])
def test_resume_continues_exactly(train_tiny, tmp_path, exp):
    """Params, optimizer state, step, RNG (dropout is on) and the data position all come back."""
    extra = ("trainer.steps=20", "trainer.log_every=5", "trainer.ckpt_every=10", "model.dropout=0.1")
    full, full_dir = train_tiny(exp, *extra, run_dir=tmp_path / "full")
    half, half_dir = train_tiny(exp, *extra, run_dir=tmp_path / "half")
    shutil.rmtree(os.path.join(half_dir, "checkpoints", "20"))  # as if stopped after step 10's checkpoint
    resumed, resumed_dir = train_tiny(exp, *extra, f"trainer.resume={half_dir}", run_dir=tmp_path / "resumed")
    after = [r for r in metrics(full_dir) if r["step"] > 10]
    got = metrics(resumed_dir)
    assert [r["step"] for r in got] == [15, 20]
    assert [r["loss"] for r in got] == [r["loss"] for r in after]  # exactly equal, not close
    assert resumed["val"] == full["val"]
    assert json.load(open(os.path.join(resumed_dir, "env.json")))["start_step"] == 10


def test_resume_auto_in_a_fixed_run_dir_continues_there(train_tiny, tmp_path):
    """A cluster job restarted into the same hydra.run.dir picks up its own checkpoint; its first launch starts."""
    _, run_dir = train_tiny("digits_mlp", "trainer.resume=auto", run_dir=tmp_path / "fixed")
    _, again = train_tiny("digits_mlp", "trainer.steps=30", "trainer.resume=auto", run_dir=tmp_path / "fixed")
    assert again == run_dir and [r["step"] for r in metrics(run_dir)] == [5, 10, 15, 20, 25, 30]


def test_resume_auto_picks_the_latest_run_with_a_checkpoint(train_tiny, tmp_path):
    exp_dir = tmp_path / "runs" / "digits_mlp"
    _, old = train_tiny("digits_mlp", run_dir=exp_dir / "2026-01-01_00-00-00_aaaaaa")
    os.makedirs(exp_dir / "2026-01-02_00-00-00_bbbbbb")  # a later run that died before its first checkpoint
    assert checkpoint.find_run("auto", str(exp_dir / "2026-01-03_00-00-00_cccccc")) == old
    _, new = train_tiny("digits_mlp", "trainer.steps=30", "trainer.resume=auto",
                        run_dir=exp_dir / "2026-01-03_00-00-00_cccccc")
    assert [r["step"] for r in metrics(new)] == [25, 30]


def test_resume_falls_back_past_a_corrupt_or_empty_latest_step(train_tiny, tmp_path, caplog):
    extra = ("trainer.steps=20", "trainer.ckpt_every=10", "trainer.max_to_keep=5")
    _, run_dir = train_tiny("digits_mlp", *extra, run_dir=tmp_path / "a")
    ckpts = os.path.join(run_dir, "checkpoints")
    for root, _, files in os.walk(os.path.join(ckpts, "20", "state")):
        for f in files:  # corrupt every data file of the newest step
            open(os.path.join(root, f), "wb").write(b"\0garbage")
    os.makedirs(os.path.join(ckpts, "30"))  # and an empty newer step, as a crash mid-save can leave
    _, resumed = train_tiny("digits_mlp", *extra, "trainer.steps=25", f"trainer.resume={run_dir}",
                            run_dir=tmp_path / "b")
    assert json.load(open(os.path.join(resumed, "env.json")))["start_step"] == 10
    assert "is damaged" in caplog.text


def test_resume_errors(train_tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint.find_run(str(tmp_path / "missing"), str(tmp_path / "x"))
    os.makedirs(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        checkpoint.find_run(str(tmp_path / "empty_run"), str(tmp_path / "x"))
    os.makedirs(tmp_path / "empty_run" / "checkpoints" / "10")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        train_tiny("digits_mlp", f"trainer.resume={tmp_path / 'empty_run'}", run_dir=tmp_path / "y")
    assert checkpoint.find_run("auto", str(tmp_path / "lonely" / "run")) is None  # first launch: start fresh


def test_resume_with_another_model_config_is_a_clear_error(train_tiny, shared_run, tmp_path):
    _, run_dir = shared_run("digits_mlp")
    # A healthy step of another model is not "damaged": no fall back to an older step, an error naming the arrays
    with pytest.raises(CheckpointError, match=r"another model or optimizer config .*layers\.0\.kernel.*"
                                              r"shape \(64, 32\) there, \(64, 64\) here"):
        train_tiny("digits_mlp", "model.hidden=[64]", f"trainer.resume={run_dir}", run_dir=tmp_path / "b")


def test_non_finite_loss_stops_naming_the_step_and_saves_nothing(train_tiny, tmp_path):
    x = np.random.rand(100, 4).astype(np.float32)
    x[7:, 0] = np.inf  # after the split's shuffle nearly every batch holds an inf input
    np.savez(tmp_path / "bad.npz", inputs=x, targets=np.arange(100) % 3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 1; last good checkpoint: none"):
        train_tiny("digits_mlp", "data=arrays", f"data.path={tmp_path / 'bad.npz'}", "data.batch_size=16",
                   run_dir=tmp_path / "run")
    assert not checkpoint.has_checkpoint(str(tmp_path / "run"))


def test_custom_model_from_outside_the_package_trains(train_tiny):
    results, _ = train_tiny(None, "model=custom", "model.target=tests.fixtures.user_model:TinyNet",
                            "+model.kwargs.width=8", "trainer.steps=100", "trainer.log_every=50")
    assert results["test"]["accuracy"] > 0.1


def test_wandb_offline_run_lives_in_the_run_dir(train_tiny):
    _, run_dir = train_tiny("digits_mlp", "logger=wandb")
    runs = [n for n in os.listdir(os.path.join(run_dir, "wandb")) if n.startswith("offline-run-")]
    assert len(runs) == 1
    assert os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))


def test_same_config_and_seed_give_bit_identical_losses(train_tiny, tmp_path):
    extra = ("model.dropout=0.1", "trainer.steps=20")
    _, a = train_tiny("digits_cnn", *extra, run_dir=tmp_path / "a")
    _, b = train_tiny("digits_cnn", *extra, run_dir=tmp_path / "b")
    _, c = train_tiny("digits_cnn", *extra, "seed=1", run_dir=tmp_path / "c")
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]
    assert [r["loss"] for r in metrics(a)] != [r["loss"] for r in metrics(c)]


def test_a_dirty_git_tree_is_recorded_with_its_diff(train_tiny, tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    (repo / "model.py").write_text("width = 8\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / "model.py").write_text("width = 16\n")  # uncommitted
    monkeypatch.chdir(repo)
    _, run_dir = train_tiny("digits_mlp", run_dir=tmp_path / "run")
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["git"]["dirty"] is True and env["git"]["diff_file"] == "git.diff"
    assert "+width = 16" in open(os.path.join(run_dir, "git.diff")).read()
