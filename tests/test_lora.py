"""LoRA fine-tuning and trainer.init_from: adapters only are trained, the run starts at the pretrained function,
frozen weights never move, the merged export equals the adapted model, and mismatched runs are refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys.errors import CheckpointError, ConfigError
from mlsys.export.restore import load_run
from mlsys.models import GPTConfig, MLPConfig, build_model
from mlsys.spec import DataSpec
from mlsys.models.lora import Frozen, LoRAConfig, LoRALinear, add_lora, count, merge_lora

SPEC = DataSpec("lm", (16,), "int32", 65)


def tiny_gpt(seed=0):
    return build_model(GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=16), SPEC, nnx.Rngs(seed))


def test_adapters_start_at_the_base_function_and_alone_are_params():
    model, tokens = tiny_gpt(), jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 65
    before = model(tokens)
    adapted = add_lora(model, LoRAConfig(rank=4, targets=["*attn.qkv", "*mlp.fc"]), nnx.Rngs(1))
    np.testing.assert_array_equal(adapted(tokens), before)  # B = 0
    params = nnx.to_flat_state(nnx.state(adapted, nnx.Param))
    assert {p[-1] for p, _ in params} == {"lora_a", "lora_b"} and all(
        isinstance(v, nnx.LoRAParam) for _, v in params)
    assert {p[-2] for p, _ in params} == {"qkv", "fc"}  # the targets, nothing else
    trainable, total = count(adapted)
    assert trainable == 2 * (4 * (32 + 96) + 4 * (32 + 128)) and total > 10 * trainable
    # Sharding follows the adapted kernel: A by its input axis, B by its output axis.
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(nnx.state(adapted, nnx.Param))))
    # The scanned stack's kernels have a leading (replicated) layer axis, and so have their adapters.
    P = jax.sharding.PartitionSpec
    assert specs[("blocks", "attn", "qkv", "lora_a")].get_value() == P(None, "embed", None)
    assert specs[("blocks", "attn", "qkv", "lora_b")].get_value() == P(None, None, "heads")


def test_merge_folds_the_adapters_into_plain_layers():
    model, tokens = tiny_gpt(), jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 65
    adapted = add_lora(model, LoRAConfig(rank=4), nnx.Rngs(1))
    for path, v in nnx.iter_graph(adapted):
        if isinstance(v, nnx.LoRAParam):  # move away from B = 0
            v[...] = jax.random.normal(jax.random.key(len(path)), v[...].shape) * 0.05
    want = adapted(tokens)
    merged = merge_lora(adapted)
    assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(merged))
    assert not nnx.state(merged, Frozen) and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(merged(tokens), want, atol=1e-5)
    # Structurally the plain model: the same parameter paths and shapes.
    shapes = lambda m: {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa
    assert shapes(merged) == shapes(tiny_gpt())


def test_targets_that_match_nothing_name_the_layers():
    with pytest.raises(ConfigError, match=r"matches no nnx.Linear of MLP; its linear layers are \['layers.0"):
        add_lora(build_model(MLPConfig(hidden=[8]), DataSpec("classify", (4,), "float32", 3), nnx.Rngs(0)),
                 LoRAConfig(rank=2, targets=["*attn*"]), nnx.Rngs(0))


def flat(state) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_lora_run_trains_adapters_only_and_exports_merged(train_tiny, shared_run, tmp_path):
    base_results, base_dir = shared_run("shakespeare_char")
    results, run_dir = train_tiny("shakespeare_char_lora", f"trainer.init_from={base_dir}", "trainer.steps=10",
                                  run_dir=tmp_path / "lora")
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["init_from"] == base_dir and env["n_trainable"] < env["n_params"]
    assert env["trainable_fraction"] == pytest.approx(env["n_trainable"] / env["n_params"])
    base, tuned = load_run(base_dir), load_run(run_dir, merge=False).model
    b, t = flat(nnx.state(base.model, nnx.Param)), flat(nnx.state(tuned, Frozen))
    assert b.keys() == t.keys() and all(np.array_equal(b[k], t[k]) for k in b)  # frozen: bit-identical
    lora_b = [v for p, v in flat(nnx.state(tuned, nnx.LoRAParam)).items() if p[-1] == "lora_b"]
    assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)  # adapters moved off zero
    assert results["val"]["loss"] < base_results["val"]["loss"]
    from mlsys.export import export_run

    out = export_run(run_dir, formats=("onnx",), decoder=False)  # the merged model.onnx; decoders: test_lm_export
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["lora"]["merged"] and manifest["lora"]["rank"] == 8
    assert manifest["parity"]["onnx_max_abs_diff"] < 1e-4


def test_lora_run_starts_exactly_at_the_pretrained_model(shared_run):
    """Step 0 of a fine-tune evaluates like the run it starts from (the adapters add zero)."""
    from mlsys import data
    from mlsys.parallel import make_mesh
    from mlsys.train.build import build
    from mlsys.train.pretrained import load_pretrained
    from tests.conftest import tiny, typed_cfg

    _, base_dir = shared_run("shakespeare_char")
    cfg = typed_cfg(tiny("shakespeare_char_lora", f"trainer.init_from={base_dir}"))
    ds = data.load(cfg.data, cfg.seed)
    mesh = make_mesh(cfg.mesh)
    run = build(cfg, ds.spec, mesh, cfg.trainer.steps)
    state, step = load_pretrained(base_dir, cfg, ds.spec, run.state, mesh)
    tokens = jnp.asarray(np.stack([ds.splits["val"][i]["inputs"] for i in range(4)]))
    got = nnx.merge(run.eval_def, state.params, state.rest)(tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(load_run(base_dir).model(tokens)))
    assert step == 10


@pytest.mark.parametrize("base_overrides,exp,extra,message", [
    (["model.n_layer=2"], "shakespeare_char_lora", [],
     r"its model does not match this one \(blocks.attn.proj.bias: shape \(2, 32\) there, \(1, 32\) here.*"
     r"model.n_layer=2 there, 1 here"),
    (["model.d_model=64"], "shakespeare_char", [], r"shape \(1, 64, 192\) there, \(1, 32, 96\) here"),
])
def test_init_from_a_different_model_is_refused(train_tiny, tmp_path, base_overrides, exp, extra, message):
    _, base_dir = train_tiny("shakespeare_char", *base_overrides, run_dir=tmp_path / "base")
    with pytest.raises(ConfigError, match=message):
        train_tiny(exp, f"trainer.init_from={base_dir}", *extra, run_dir=tmp_path / "tuned")


def test_init_from_another_family_or_nothing(train_tiny, shared_run, tmp_path):
    _, mlp_dir = shared_run("digits_mlp")
    with pytest.raises(ConfigError, match="that run trained model=mlp, this one is model=gpt"):
        train_tiny("shakespeare_char_lora", f"trainer.init_from={mlp_dir}", run_dir=tmp_path / "a")
    with pytest.raises(CheckpointError, match="trainer.init_from: .* not a run dir"):
        train_tiny("shakespeare_char_lora", f"trainer.init_from={tmp_path}", run_dir=tmp_path / "b")
    from mlsys.config import validate
    from tests.conftest import typed_cfg

    with pytest.raises(ConfigError, match=r"lora.rank=8: adapts a trained model: set trainer.init_from"):
        validate(typed_cfg(["+exp=shakespeare_char_lora"]), n_devices=8)


def test_lora_under_shard_map_on_fsdp_matches_one_device(train_tiny, shared_run, tmp_path):
    """The frozen weights are fsdp-sliced like parameters: the shard_map step gathers them and never updates them."""
    _, base_dir = shared_run("shakespeare_char")  # only read; its batch size is no matter
    runs = {}
    for name, extra in {"one": [], "fsdp": ["mesh=fsdp", "trainer.step=shard_map"]}.items():
        _, runs[name] = train_tiny("shakespeare_char_lora", f"trainer.init_from={base_dir}", "data.batch_size=8",
                                   *extra, run_dir=tmp_path / name)
    losses = {k: [r["loss"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if r["split"] == "train"]
              for k, d in runs.items()}
    np.testing.assert_allclose(losses["fsdp"], losses["one"], atol=1e-5)
    base = flat(nnx.state(load_run(base_dir).model, nnx.Param))
    tuned = flat(nnx.state(load_run(runs["fsdp"], merge=False).model, Frozen))
    assert all(np.array_equal(base[k], tuned[k]) for k in base)
