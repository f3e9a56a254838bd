"""The decoder families on the shared transformer layers: scanned and unrolled stacks agree (losses, gradients,
remat inside the scan), llama trains on every mesh, the KV cache decodes exactly what the uncached sampler does,
a llama run exports with parity and generates from the command line, and bad inputs fail in one line."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mlsys.config import validate
from mlsys.errors import ConfigError
from mlsys.generate import complete, generate
from mlsys.tokenizer import CharTokenizer
from mlsys.models import GPT, GPTConfig, Llama, LlamaConfig
from mlsys.spec import DataSpec
from tests.conftest import ROOT, typed_cfg
from tests.test_mesh import MESHES, baseline, mesh_args, train_steps

LM = DataSpec("lm", (16,), "int32", 37)
LLAMA = ["+exp=shakespeare_char", "model=llama", "model.n_layer=2", "model.d_model=32", "model.n_head=4",
         "model.n_kv_head=2", "data.seq_len=16", "data.batch_size=8", "optim.warmup_steps=0"]
FAMILIES = {
    "gpt": (GPT, GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=24)),
    "gpt-rope": (GPT, GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=24, pos_emb="rope", bias=False)),
    "llama": (Llama, LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, block_size=24, rope_scaling=8.0,
                                 rope_original_max_len=16)),
}


def build(family: str, **changes):
    cls, cfg = FAMILIES[family]
    return cls(type(cfg)(**{**cfg.__dict__, **changes}), LM, rngs=nnx.Rngs(0))


@nnx.jit
def loss_and_grads(model, x, y, segments=None):
    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x, segments), y).mean()

    return nnx.value_and_grad(loss)(model)


def stacked(grads_unrolled):
    """Per-layer gradients of an unrolled stack ({0: ..., 1: ...}) stacked like the scanned layout."""
    flat = nnx.to_pure_dict(grads_unrolled)
    blocks = flat.pop("blocks")
    flat["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), *[blocks[i] for i in sorted(blocks)])
    return flat


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_scanned_and_unrolled_stacks_agree(family):
    """Same seed → same weights in both layouts; same loss and gradients within 1e-5, remat inside the scan too,
    the stacked layers run as a Python loop (model.unroll_layers) too, and with packed segments (llama)."""
    x = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    y = jax.random.randint(jax.random.key(2), (2, 16), 0, 37)
    segments = jnp.array([[1] * 6 + [2] * 10, [1] * 16]) if family == "llama" else None
    l0, g0 = loss_and_grads(build(family, scan_layers=False), x, y, segments)
    want = stacked(g0)
    for remat, unroll in (("none", False), ("full", False), ("none", True)):  # unroll: the stacked weights looped
        l1, g1 = loss_and_grads(build(family, scan_layers=True, remat=remat, unroll_layers=unroll), x, y, segments)
        assert abs(float(l1) - float(l0)) <= 1e-5
        for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g1)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_llama_is_causal_and_respects_segments():
    model = build("llama")
    x = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    changed = x.at[:, 10].set((x[:, 10] + 1) % 37)
    a, b = model(x), model(changed)
    assert jnp.allclose(a[:, :10], b[:, :10], atol=1e-6) and not jnp.allclose(a[:, 10:], b[:, 10:])
    # A packed row: the second document's logits equal that document run alone (positions restart at 0).
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    packed = model(x[:1], seg, pos)
    np.testing.assert_allclose(packed[0, 6:], model(x[:1, 6:])[0], atol=1e-5)


# llama on every mesh layout, each step kind on some; tests/test_mesh.py's GPT gets the other step kind on each mesh.
@pytest.mark.parametrize("shape, step", [(s, "shard_map" if i % 2 else "jit") for i, s in enumerate(MESHES)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_llama_on_every_mesh_matches_one_device(shape, step):
    losses, params, _ = train_steps(LLAMA + mesh_args(shape) + [f"trainer.step={step}"])
    base_losses, base_params = baseline("llama", LLAMA)
    np.testing.assert_allclose(losses, base_losses, atol=1e-5, rtol=0)
    for got, want in zip(params, base_params):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def sharpened(model):
    """Weights scaled up so that a random model's greedy continuations vary (a model at initialisation repeats)."""
    nnx.update(model, jax.tree.map(lambda p: p * 3, nnx.state(model, nnx.Param)))
    return model


@pytest.mark.parametrize("family", ["gpt", "gpt-rope", "llama"])
def test_kv_cache_greedy_equals_uncached(family):
    model = sharpened(build(family, scan_layers=family != "gpt-rope"))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]  # different lengths in one batch
    cached = generate(model, prompts, 14, temperature=0)  # 8 + 14 <= block_size 24: within the block
    assert cached == generate(model, prompts, 14, temperature=0, cached=False)
    # A random model's greedy continuation may be one token repeated: sampled ones vary, and agree too (the same
    # key draws the same tokens from logits that agree to float rounding).
    key = jax.random.key(7)
    sampled = generate(model, prompts, 14, key=key, temperature=1.0)
    assert sampled == generate(model, prompts, 14, key=key, temperature=1.0, cached=False)
    assert all(len(set(c)) > 3 for c in sampled)
    # Past the block the cache slides; sampling with top-k and top-p; EOS stops a row (and is not returned).
    long = generate(model, prompts, 40, key=jax.random.key(3), temperature=0.8, top_k=5, top_p=0.9)
    assert [len(c) for c in long] == [40, 40, 40] and all(0 <= t < 37 for c in long for t in c)
    eos = cached[1][4]
    stopped = generate(model, prompts, 14, temperature=0, eos_id=eos)
    assert stopped[1] == cached[1][: cached[1].index(eos)]


def test_bad_model_and_prompt_inputs():
    with pytest.raises(ConfigError, match=r"model.n_kv_head=3: model.n_head=4 must be a multiple of it"):
        validate(typed_cfg(LLAMA + ["model.n_kv_head=3"]), n_devices=8)
    model = build("llama")
    with pytest.raises(ConfigError, match=r"prompt 0: 25 tokens, longer than the model's block_size=24"):
        generate(model, [list(range(25))], 4)
    with pytest.raises(ConfigError, match=r"prompt='\?\?': empty after tokenization"):
        complete(model, CharTokenizer(list("abc")), "??", 4)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from mlsys.train import train
    from tests.conftest import tiny

    run_dir = str(tmp_path_factory.mktemp("llama") / "run")
    results = train(typed_cfg(tiny("shakespeare_char", "model=llama", "model.n_head=4", "model.n_kv_head=2")),
                    run_dir)
    assert len(results["sample"]) == 20  # the end-of-training sample, through mlsys.generate
    return run_dir


@pytest.mark.slow
def test_llama_run_exports_with_parity(llama_run, tmp_path, monkeypatch):
    from mlsys.export import export_run
    from mlsys.export.manifest import verify

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    m = verify(export_run(llama_run, out=str(tmp_path / "export")))
    assert m["family"] == "llama" and m["formats"] == ["onnx", "torch"]
    assert m["parity"]["onnx_max_abs_diff"] <= 1e-4 and m["parity"]["torch_max_abs_diff"] <= 1e-4
    # The KV-cache decoder in both forms (grouped-query heads), gated against mlsys.generate (test_lm_export.py).
    d = m["decoder"]["parity"]
    assert d["tokens_equal"] and d["onnx_max_abs_logit_diff"] <= 1e-4 and d["torch_max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_generate_cli(llama_run):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run([sys.executable, "-m", "experiments.generate", f"run={llama_run}", "prompt=ROMEO:",
                         "max_new_tokens=30", "temperature=0"], capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0 and ok.stdout.startswith("ROMEO:") and len(ok.stdout) == 6 + 30 + 1, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "experiments.generate", f"run={llama_run}", "prompt=" + "a" * 65],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "65 tokens, longer than the model's block_size=64" in bad.stderr
    assert "Traceback" not in bad.stderr
