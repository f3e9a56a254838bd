"""Meshes: every (data, fsdp, tensor) layout and both step kinds give the single-device numbers; FSDP really
splits the memory; checkpoints move between meshes; bad meshes fail clearly."""

import os

import jax
import numpy as np
import pytest

from mlsys import checkpoint, data
from mlsys.config import validate
from mlsys.errors import ConfigError, MlsysError
from mlsys.parallel import activation_sharding, bytes_per_device, init_distributed, make_mesh
from mlsys.train.build import build
from tests.conftest import typed_cfg

GPT = ["+exp=shakespeare_char", "model.n_layer=2", "model.d_model=32", "model.n_head=4", "data.seq_len=16",
       "data.batch_size=8", "optim.warmup_steps=0"]
MLP = ["+exp=digits_mlp", "model.hidden=[32,32]", "data.batch_size=16", "model.dropout=0", "optim.warmup_steps=0"]
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]


def mesh_args(shape):
    return [f"mesh.shape={{data:{shape[0]},fsdp:{shape[1]},tensor:{shape[2]}}}"]


def train_steps(overrides, n=5):
    """n steps on the mesh the overrides describe; returns (losses, params on the host, Trainer)."""
    cfg = typed_cfg(overrides)
    validate(cfg, jax.device_count())
    mesh = make_mesh(cfg.mesh)
    ds = data.load(cfg.data, cfg.seed)
    it = data.train_iterator(ds.splits["train"], cfg.data.batch_size, cfg.seed)
    run = build(cfg, ds.spec, mesh, n)
    state, losses = run.state, []
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        for _ in range(n):
            batch = {k: jax.make_array_from_process_local_data(run.batch_sharding, v) for k, v in next(it).items()}
            state, metrics = run.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses), [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))], run


_baselines = {}


def baseline(model, overrides=None):
    """One-device losses and parameters of `model` (gpt, mlp, or a name for `overrides`), computed once."""
    if model not in _baselines:
        args = overrides or (GPT if model == "gpt" else MLP)
        _baselines[model] = train_steps(args + mesh_args((1, 1, 1)))[:2]
    return _baselines[model]


# The MLP on every mesh with both step kinds. The GPT (a compile of a few CPU seconds each) on every mesh with one
# step kind: the other one than tests/test_llama.py's llama on that mesh, so that between them the transformer stack
# meets every (mesh, step) pair.
CASES = [("mlp", s, step) for s in MESHES for step in ("jit", "shard_map")] + [
    ("gpt", s, "jit" if i % 2 else "shard_map") for i, s in enumerate(MESHES)]


@pytest.mark.parametrize("model, shape, step", CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_every_mesh_matches_one_device(model, shape, step):
    losses, params, _ = train_steps((GPT if model == "gpt" else MLP) + mesh_args(shape) + [f"trainer.step={step}"])
    base_losses, base_params = baseline(model)
    np.testing.assert_allclose(losses, base_losses, atol=1e-5, rtol=0)
    for got, want in zip(params, base_params):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_fsdp_holds_one_eighth_of_every_sharded_array_per_device():
    _, _, run = train_steps(GPT + mesh_args((1, 8, 1)), n=0)  # n=0: run.state is not donated yet
    state = run.state
    sharded = 0
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(run.shardings)):
        if "fsdp" in jax.tree.leaves(tuple(s.spec)):
            sharded += 1
            assert all(sh.data.size * 8 == x.size for sh in x.addressable_shards)
    # 4 stacked block kernels (one array per kind, all layers) + 2 embeddings carry an "embed" axis, mapped to
    # fsdp: params, Adam's mu and nu
    assert sharded == 3 * (4 + 2)
    per_device = bytes_per_device(state)
    assert len(per_device) == 8 and max(per_device.values()) < 0.2 * sum(x.nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize("saved_by, restored_by", [("jit", "shard_map"), ("shard_map", "jit")])
def test_checkpoint_restores_onto_other_meshes(tmp_path, train_tiny, saved_by, restored_by):
    """Across meshes, and across the two step kinds (their optimizer states have the same structure)."""
    _, run_dir = train_tiny("shakespeare_char", "trainer.steps=4", "trainer.ckpt_every=4", "model.n_head=4",
                            "data.batch_size=8", f"trainer.step={saved_by}",
                            *mesh_args((1, 8, 1)))
    saved = None
    for shape in [(1, 8, 1), (2, 2, 2), (1, 1, 1)]:
        cfg = typed_cfg(["+exp=shakespeare_char", "model.n_layer=1", "model.d_model=32", "model.n_head=4",
                         "data.seq_len=16", "data.batch_size=8", f"trainer.step={restored_by}", *mesh_args(shape)])
        mesh = make_mesh(cfg.mesh)
        ds = data.load(cfg.data, cfg.seed)
        it = data.train_iterator(ds.splits["train"], cfg.data.batch_size, cfg.seed)
        run = build(cfg, ds.spec, mesh, 4)
        state, step = checkpoint.restore(run_dir, checkpoint.abstract_like(run.state, run.shardings), it)
        assert step == 4
        leaves = jax.tree.leaves(state.params)
        assert all(x.sharding == s for x, s in zip(leaves, jax.tree.leaves(run.shardings.params)))
        host = [np.asarray(x) for x in leaves]
        if saved is None:
            saved = host
        for a, b in zip(host, saved):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides, message", [
    (mesh_args((2, 2, 1)), "uses 4 of the 8 devices"),
    (mesh_args((4, 4, 1)), "needs 16 devices but only 8 exist"),
    (["mesh.param_rules.embed=[pipeline]"], "mesh.param_rules.embed=['pipeline']: ['pipeline'] is not a mesh axis"),
    (mesh_args((1, 1, 8)), "model.n_head=4: must be divisible by the tensor-parallel size 8"),
    (mesh_args((1, 2, 4)) + ["model.d_ff=102"], "model.d_ff=102: must be divisible by the tensor-parallel size 4"),
    (mesh_args((2, 4, 1)) + ["data.batch_size=12"], "data.batch_size=12: must be divisible by the data-parallel size 8"),
    (["trainer.step=pmap"], "trainer.step='pmap'"),
])
def test_bad_meshes_fail_before_compiling(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(typed_cfg(GPT + overrides), n_devices=8)


def test_a_parameter_name_the_rules_do_not_know():
    cfg = typed_cfg(GPT + ["~mesh.param_rules.heads"])
    with pytest.raises(ConfigError, match="logical axis 'heads', which mesh.param_rules does not map"):
        build(cfg, data.load(cfg.data, 0).spec, make_mesh(cfg.mesh), 1)


def test_coordinator_that_never_answers_times_out_clearly():
    """A process waiting for a coordinator that is not there stops after dist.timeout_s with one clear line."""
    import subprocess
    import sys

    from mlsys.launch import free_port

    code = ("from mlsys.config import DistConfig; from mlsys.parallel import init_distributed\n"
            f"init_distributed(DistConfig(num_processes=2, process_id=1, coordinator='127.0.0.1:{free_port()}', "
            "timeout_s=3))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 2
    assert "error: could not join the other processes at 127.0.0.1" in out.stderr, out.stderr[-2000:]
    assert "dist.timeout_s=3 s" in out.stderr and "Check failure" not in out.stderr


def test_dist_config_errors():
    from mlsys.config import DistConfig

    with pytest.raises(ConfigError, match="needs dist.coordinator"):
        init_distributed(DistConfig(num_processes=2))
    with pytest.raises(ConfigError, match=r"dist.process_id=5: must be in \[0, 2\)"):
        init_distributed(DistConfig(num_processes=2, process_id=5, coordinator="127.0.0.1:1"))
    assert issubclass(ConfigError, MlsysError)
