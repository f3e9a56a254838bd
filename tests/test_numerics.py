"""Numerical faults, injected for real (NaN/Inf rows in the data, an overflowing learning rate): trainer.on_nan=stop
names the step and the last good checkpoint; on_nan=skip leaves the state untouched on the device, counts, and
stops after trainer.max_nan_skips in a row; loss spikes are logged."""

import json
import os

import jax
import numpy as np
import pytest

from mlsys import checkpoint, data
from mlsys.errors import NonFiniteError
from mlsys.parallel import make_mesh
from mlsys.train.build import build
from mlsys.train.guard import NumericsGuard
from tests.conftest import tiny, typed_cfg


def rows(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def npz(path, n=400, nan_rows=(), huge_rows=(), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8), dtype=np.float32)
    x[list(nan_rows), 3] = np.nan
    x[list(huge_rows)] *= 1e4
    np.savez(path, inputs=x, targets=(np.arange(n) % 4).astype(np.int32))
    return str(path)


ARRAYS = ("data=arrays", "data.batch_size=16", "model.hidden=[16]", "model.dropout=0.0")


def host(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("kind, mesh", [("jit", "single"), ("shard_map", "fsdp")])
def test_skip_happens_inside_the_jitted_step(tmp_path, kind, mesh):
    """A NaN batch leaves params and optimizer state bit-identical (on every shard); a clean batch moves them."""
    path = npz(tmp_path / "x.npz")
    cfg = typed_cfg(tiny("digits_mlp", *ARRAYS, f"data.path={path}", "trainer.on_nan=skip", f"trainer.step={kind}",
                         f"mesh={mesh}", "model.dropout=0.1"))
    m = make_mesh(cfg.mesh)
    ds = data.load(cfg.data, cfg.seed)
    run = build(cfg, ds.spec, m, 10)
    batch = next(data.train_iterator(ds.splits["train"], 16, 0))
    bad = {**batch, "inputs": np.where(np.arange(16)[:, None] == 5, np.nan, batch["inputs"]).astype(np.float32)}

    def put(b):
        return {k: jax.device_put(v, run.batch_sharding) for k, v in b.items()}

    with jax.set_mesh(m):
        before = host((run.state.params, run.state.opt_state))
        state, metrics = run.train_step(run.state, put(bad))
        assert not np.isfinite(float(metrics["loss"]))
        assert all(np.array_equal(a, b) for a, b in zip(host((state.params, state.opt_state)), before))
        assert int(state.step) == 1  # the step counter (and the data) move on
        state, metrics = run.train_step(state, put(batch))
        assert np.isfinite(float(metrics["loss"]))
        after = host((state.params, state.opt_state))
        assert not all(np.array_equal(a, b) for a, b in zip(after, before))
        assert all(np.isfinite(a).all() for a in after)


def test_skip_mode_continues_counts_and_keeps_the_state_finite(train_tiny, tmp_path):
    path = npz(tmp_path / "x.npz", nan_rows=range(0, 400, 97))  # 5 NaN rows: about a fifth of the batches
    results, run_dir = train_tiny("digits_mlp", *ARRAYS, f"data.path={path}", "trainer.on_nan=skip",
                                  "trainer.steps=60", "trainer.log_every=10", "trainer.eval_every=0")
    got = rows(run_dir)
    skips = [r["nan_skips"] for r in got]
    assert 0 < skips[-1] < 60 and skips == sorted(skips)
    assert all(np.isfinite(r["loss"]) for r in got)  # the mean over the steps that updated
    assert not rows(run_dir, "loss_spike")
    cfg = typed_cfg(tiny("digits_mlp", *ARRAYS, f"data.path={path}", "trainer.on_nan=skip"))
    ds = data.load(cfg.data, 0)
    it = data.train_iterator(ds.splits["train"], 16, 0)
    skipped = sum(not np.isfinite(next(it)["inputs"]).all() for _ in range(60))
    assert skips[-1] == skipped  # exactly the batches holding a NaN row
    run = build(cfg, ds.spec, make_mesh(cfg.mesh), 60)
    state, step = checkpoint.restore(run_dir, checkpoint.abstract_like(run.state, run.shardings), it)
    assert step == 60 and all(np.isfinite(a).all() for a in host((state.params, state.opt_state)))


def test_skip_mode_stops_after_max_nan_skips_in_a_row(train_tiny, tmp_path):
    path = npz(tmp_path / "x.npz", nan_rows=range(400))  # every batch
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(trainer.max_nan_skips=3\) had a non-finite loss "
                                             r"or gradient and were skipped, the last at step 3"):
        train_tiny("digits_mlp", *ARRAYS, f"data.path={path}", "trainer.on_nan=skip", "trainer.max_nan_skips=3",
                   "trainer.log_every=5", "trainer.ckpt_every=5", run_dir=tmp_path / "run")
    assert not checkpoint.has_checkpoint(str(tmp_path / "run"))


def test_stop_mode_names_the_step_and_the_last_good_checkpoint(train_tiny, tmp_path):
    """An exploding learning rate overflows the parameters: step 1 is saved, a later step's loss is not finite."""
    with pytest.raises(NonFiniteError) as e:
        train_tiny("digits_mlp", "optim=sgd", "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=0",
                   "trainer.log_every=1", "trainer.ckpt_every=1", "trainer.max_to_keep=50", run_dir=tmp_path / "r")
    msg = str(e.value)
    bad = int(msg.split(" at step ")[1].split(";")[0])
    assert bad >= 2 and f"last good checkpoint: step {bad - 1} in {tmp_path / 'r' / 'checkpoints'}" in msg
    assert "trainer.on_nan=skip" in msg
    saved = [int(n) for n in os.listdir(tmp_path / "r" / "checkpoints") if n.isdigit()]
    assert max(saved) == bad - 1  # nothing non-finite was saved


def test_loss_spikes_are_logged(train_tiny, tmp_path, caplog):
    path = npz(tmp_path / "x.npz", huge_rows=[11, 222])  # inputs 10^4 times larger: a loss far above the rest
    _, run_dir = train_tiny("digits_mlp", *ARRAYS, f"data.path={path}", "trainer.steps=60", "trainer.log_every=1",
                            "trainer.eval_every=0")
    spikes = rows(run_dir, "loss_spike")
    assert spikes and all(s["loss"] > 3 * s["running_mean"] for s in spikes)
    train = {r["step"]: r["loss"] for r in rows(run_dir)}
    assert all(train[s["step"]] == s["loss"] for s in spikes)
    assert "loss spike at step" in caplog.text


def test_spike_rule():
    g = NumericsGuard("stop", 10, 3.0, "/ckpt")
    assert [g.spike(v) for v in (2.0, 1.8, 1.6)] == [None, None, None]
    assert g.spike(9.0) == pytest.approx(1.8)  # 9 > 3 x mean(2.0, 1.8, 1.6)
    assert g.spike(1.5) is None and g.history[-1] == 1.5  # the spike stayed out of the running mean
    assert NumericsGuard("stop", 10, 0.0, "/ckpt").spike(1e9) is None  # spike_factor=0: off
