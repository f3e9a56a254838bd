"""Speed techniques, each by config: gradient accumulation, remat, bf16 compute, vocabulary padding, attention
implementation; speed reporting (tokens/s, MFU), profiling and the persistent compilation cache."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys.config import validate
from mlsys.errors import ConfigError
from mlsys.models import GPT, GPTConfig
from mlsys.spec import DataSpec
from tests.conftest import ROOT, typed_cfg
from tests.test_mesh import GPT as GPT_ARGS
from tests.test_mesh import MLP as MLP_ARGS
from tests.test_mesh import mesh_args, train_steps

LM = DataSpec("lm", (16,), "int32", 37)


@pytest.mark.parametrize("model, extra", [
    ("gpt", mesh_args((1, 1, 1))),
    ("mlp", mesh_args((1, 1, 1))),
    ("gpt", mesh_args((2, 4, 1)) + ["trainer.step=shard_map"]),
])
def test_grad_accumulation_equals_one_big_batch(model, extra):
    args = (GPT_ARGS if model == "gpt" else MLP_ARGS) + extra + ["data.batch_size=32"]
    whole, whole_params, _ = train_steps(args, n=3)
    accum, accum_params, _ = train_steps(args + ["trainer.grad_accum=4"], n=3)
    np.testing.assert_allclose(accum, whole, atol=1e-5, rtol=0)
    for a, b in zip(accum_params, whole_params):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def grads_of(cfg: GPTConfig):
    model = GPT(cfg, LM, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.key(1), (4, 16), 0, 37)

    def loss(m):
        logits = m(x)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_policies_change_memory_not_numbers(policy):
    base = GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=16)
    (l0, g0), (l1, g1) = grads_of(base), grads_of(GPTConfig(**{**base.__dict__, "remat": policy}))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_saves_fewer_activations_for_the_backward_pass():
    """What the forward pass keeps for the backward pass, counted by jax (not timed): fewer bytes with remat."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    def residual_bytes(remat):
        cfg = GPTConfig(n_layer=4, n_head=4, d_model=64, block_size=128, remat=remat)
        model = GPT(cfg, DataSpec("lm", (128,), "int32", 37), rngs=nnx.Rngs(0))
        model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = jnp.zeros((8, 128), jnp.int32)

        def loss(params):
            fresh = jax.tree.map(lambda v: v, rest)  # new Variables in this trace: NNX may update them
            return jnp.mean(nnx.merge(graphdef, params, fresh)(x))

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(loss, params)  # one line per saved array: "f32[8,128,64] from ..."
        sizes = {"f32": 4, "bf16": 2, "i32": 4, "u32": 4, "bool": 1, "pred": 1}
        return sum(sizes.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                   for t, dims in re.findall(r"^(\w+)\[([\d,]*)\]", out.getvalue(), re.M))

    none, dots, full = (residual_bytes(r) for r in ("none", "dots_saveable", "full"))
    assert full < dots < none


def test_bf16_policy_params_fp32_compute_bf16_loss_fp32():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, dtype="bfloat16"), LM, rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    x = jnp.zeros((2, 16), jnp.int32)
    assert model.ln_f(model.wte(x)).dtype == jnp.bfloat16  # activations in bf16
    assert model(x).dtype == jnp.float32  # logits (and so softmax and loss) in fp32


def test_bf16_run_trains(train_tiny):
    results, run_dir = train_tiny("shakespeare_char", "model.dtype=bfloat16", "trainer.steps=30",
                                  "trainer.log_every=10", "optim.warmup_steps=0")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"train"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"] and np.isfinite(results["val"]["loss"])


def test_vocabulary_padding_is_never_predicted():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, vocab_multiple=128), LM, rngs=nnx.Rngs(0))
    assert model.wte.embedding[...].shape == (128, 16)
    logits = model(jnp.zeros((2, 16), jnp.int32))
    assert logits.shape[-1] == 128
    probs = jax.nn.softmax(logits)
    assert float(probs[..., 37:].max()) == 0.0 and np.allclose(probs[..., :37].sum(-1), 1.0, atol=1e-5)


def test_attention_implementations():
    x = jnp.zeros((2, 16), jnp.int32)
    out = {impl: GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, attention=impl), LM, rngs=nnx.Rngs(0))(x)
           for impl in ("auto", "xla")}
    np.testing.assert_allclose(out["auto"], out["xla"], atol=1e-6)
    with pytest.raises(ConfigError, match="model.attention='cudnn': needs an NVIDIA GPU"):
        validate(typed_cfg(["+exp=shakespeare_char", "model.attention=cudnn"]), 1, platform="cpu")


def test_gpt_metrics_carry_tokens_per_second_and_mfu(shared_run):
    _, run_dir = shared_run("shakespeare_char")
    row = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).readline())
    assert row["tokens_per_s"] == pytest.approx(row["examples_per_s"] * 16)
    assert 0 < row["mfu"] < 1
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["flops_per_token"] > 0 and env["peak_source"] == "measured float32 matmul"


def test_profile_writes_a_trace(train_tiny):
    _, run_dir = train_tiny("digits_mlp", "trainer.profile=[2,4]")
    traces = [f for _, _, fs in os.walk(os.path.join(run_dir, "profile")) for f in fs if f.endswith(".xplane.pb")]
    assert traces


def test_second_launch_reuses_the_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "experiments.run", "+exp=digits_mlp", "logger=jsonl", "trainer.progress=false",
            "trainer.steps=5", "trainer.log_every=5", f"trainer.compile_cache={cache}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    for _ in range(2):
        out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        if _ == 0:
            first = set(os.listdir(cache))
    assert first and set(os.listdir(cache)) == first  # every executable of the second launch came from the cache


def test_cpu_peak_is_measured_once_per_process():
    """The ~13 GFLOP matmul that stands in for a CPU's peak runs once, not at the start of every run."""
    from mlsys.perf import measured_cpu_tflops, peak_tflops

    first, _ = peak_tflops("cpu")
    misses = measured_cpu_tflops.cache_info().misses
    assert peak_tflops("cpu") == (first, "measured float32 matmul") and first > 0
    assert measured_cpu_tflops.cache_info().misses == misses
