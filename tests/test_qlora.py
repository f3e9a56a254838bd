"""QLoRA: the quantizers against a reference (the NF4 levels rebuilt from the paper's construction; int8 per output
channel), the adapted layer at step 0 equal to the base model within the quantization error, bytes per device
counted from the arrays, a few steps lowering the loss, merge and export, and the bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys.models.lora import LoRAConfig, LoRALinear, add_lora, merge_lora
from mlsys.models.quant import NF4, dequantize, quantize


def test_nf4_levels_match_the_papers_construction_and_round_trips_are_bounded():
    from scipy.stats import norm

    # QLoRA (Dettmers et al. 2023), appendix E: 8 positive and 7 negative N(0,1) quantiles, an exact 0, to [-1, 1].
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    ref = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(NF4, ref / ref.max(), atol=1e-6)
    w = np.random.default_rng(0).standard_normal((128, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel stays exactly zero
    codes, scale = quantize(w, "int8")
    assert codes.dtype == jnp.int8 and scale.shape == (24,)
    err = np.abs(np.asarray(dequantize(codes, scale, "int8")) - w)
    assert (err <= np.asarray(scale) / 2 + 1e-7).all() and err[:, 3].max() == 0
    codes, scale = quantize(w, "nf4")
    assert codes.dtype == jnp.uint8 and codes.shape == (64, 24) and scale.shape == (2, 24)  # 2 codes a byte, 64 rows
    back = np.asarray(dequantize(codes, scale, "nf4"))
    half_gap = np.diff(NF4).max() / 2
    bound = np.repeat(np.asarray(scale), 64, axis=0) * half_gap
    assert (np.abs(back - w) <= bound + 1e-6).all() and back[:, 3].max() == 0


@pytest.mark.parametrize("mode, tol", [("int8", 0.01), ("nf4", 0.25)])
def test_qlora_layer_starts_at_the_base_function_within_the_quantization_error(mode, tol):
    """Stated error at step 0 (B = 0): max |y - y_base| / max |y_base| over N(0,1) inputs into a 64 -> 32 layer is
    below 1% for int8 and 25% for NF4 (4 bits: 16 levels per block)."""
    base = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 64))
    want = base(x)
    layer = LoRALinear(base, 4, 8.0, rngs=nnx.Rngs(2), quantize=mode)
    assert not hasattr(layer, "kernel") and isinstance(layer.kernel_codes, nnx.Variable)
    got = layer(x)
    assert 0 < float(jnp.abs(got - want).max() / jnp.abs(want).max()) < tol
    grads = nnx.grad(lambda m: m(x).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    assert {p[-1] for p, _ in nnx.to_flat_state(grads)} == {"lora_a", "lora_b"}  # only the adapters learn


def test_merge_of_a_qlora_model_is_the_dequantized_plain_model():
    class Two(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(64, 8, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.head(jax.nn.relu(self.a(x)))

    model = add_lora(Two(), LoRAConfig(rank=4, targets=["a"], quantize_base="nf4"), nnx.Rngs(3))
    x = jnp.ones((2, 64))
    want = model(x)
    merged = merge_lora(model)
    assert type(merged.a) is nnx.Linear and merged.a.kernel.shape == (64, 64)
    np.testing.assert_allclose(merged(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_qlora_run_trains_stores_quantized_and_exports(train_tiny, tmp_path):
    from mlsys.export import export_run

    from dataclasses import replace

    from mlsys.config import load_saved
    from mlsys.data import load
    from mlsys.models.lora import base_bytes_per_device
    from mlsys.train.state import abstract_model, split_model

    _, q = train_tiny("shakespeare_char_lora", "trainer.steps=20", "lora.quantize_base=nf4", run_dir=tmp_path / "q")
    cfg = load_saved(q)
    plain = abstract_model(cfg.model, load(cfg.data, cfg.seed).spec, cfg.seed, replace(cfg.lora, quantize_base=None))
    _, params, rest = split_model(plain, train=True)  # the same adapted layers, their kernels in float32
    stored = json.load(open(os.path.join(q, "env.json")))["lora_base_bytes_per_device"]
    assert base_bytes_per_device(params, rest) / stored >= 6  # NF4 codes + scales, counted from the run's arrays
    rows = [json.loads(line) for line in open(os.path.join(q, "metrics.jsonl"))]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert train[-1] < train[0]
    manifest = json.load(open(os.path.join(export_run(q, formats=("onnx",), decoder=False), "manifest.json")))
    assert manifest["lora"]["quantize_base"] == "nf4" and manifest["lora"]["merged"]
