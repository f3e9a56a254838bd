"""Pruning: masks with exact counts (magnitude, structured), pruned weights exactly zero through fine-tuning,
resume and export, and the bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys.errors import ConfigError
from mlsys.models.prune import PruneConfig, add_masks, check, compute_mask, prunable, unmask


def test_masks_have_exact_counts():
    k = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    m = compute_mask(k, 0.5, "magnitude")
    assert (~m).sum() == 24 and np.abs(k[~m]).max() <= np.abs(k[m]).min()
    s = compute_mask(k, 0.75, "structured")
    assert (~s).all(axis=0).sum() == 6 and (s.all(axis=0) | (~s).all(axis=0)).all()  # whole output channels


def test_masked_layers_compute_with_kernel_times_mask_and_unmask_to_plain():
    from mlsys.models.cnn import CNN, CNNConfig
    from mlsys.spec import DataSpec

    model = CNN(CNNConfig(channels=[4], hidden=8), DataSpec("classify", (8, 8, 1), "float32", 3), rngs=nnx.Rngs(0))
    x = jnp.ones((2, 8, 8, 1))
    want = model(x)
    add_masks(model)
    kinds = {type(layer).__name__ for _, layer in prunable(model)}
    assert kinds == {"MaskedConv", "MaskedLinear"} and "head" not in {p for p, _ in prunable(model)}
    np.testing.assert_allclose(model(x), want, rtol=1e-6)  # all-ones masks: the same function
    conv = model.convs[0]
    conv.kernel_mask.set_value(jnp.zeros_like(conv.kernel_mask.get_value()))
    grads = nnx.grad(lambda m: m(x).sum())(model)
    assert float(jnp.abs(grads["convs"][0]["kernel"].get_value()).max()) == 0.0  # no gradient reaches pruned weights
    unmask(model)
    assert {type(layer).__name__ for _, layer in prunable(model)} == {"Conv", "Linear"}
    assert float(jnp.abs(model.convs[0].kernel.get_value()).max()) == 0.0


def test_bad_sparsity_and_a_model_with_nothing_to_prune():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=rf"prune.sparsity={bad}: must be in \[0, 1\)"):
            check(PruneConfig(sparsity=bad))
    with pytest.raises(ConfigError, match="prune.method='random': must be one of"):
        check(PruneConfig(sparsity=0.5, method="random"))

    class OnlyHead(nnx.Module):
        def __init__(self):
            self.embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    with pytest.raises(ConfigError, match="OnlyHead has no prunable kernels"):
        add_masks(OnlyHead())


def zeros_held(run_dir: str, masks_from: str | None = None) -> float:
    """The fraction of pruned weights (mask 0) of the run's newest checkpoint that are exactly zero."""
    from mlsys.export.restore import load_run

    model = load_run(run_dir, merge=False).model
    layers = prunable(model)
    assert layers and all(hasattr(layer, "kernel_mask") for _, layer in layers)
    pruned = [np.asarray(layer.kernel.get_value())[~np.asarray(layer.kernel_mask.get_value())] for _, layer in layers]
    return float(np.mean(np.concatenate(pruned) == 0))


@pytest.mark.slow
def test_prune_finetune_resume_export_keep_the_zeros(train_tiny, shared_run, tmp_path):
    from mlsys.export import export_run
    from mlsys.prune import prune_run

    _, dense = shared_run("digits_mlp")
    r = prune_run(dense, 0.75, out=str(tmp_path / "pruned"))
    c = r["pruned_weights"]
    assert c["zeros"] == sum(int(0.75 * n) for n in (64 * 32,)) and r["after"]["test"]["accuracy"] > 0
    assert zeros_held(r["run_dir"]) == 1.0
    _, ft = train_tiny("digits_mlp", f"trainer.init_from={r['run_dir']}", "trainer.steps=10", "trainer.ckpt_every=5",
                       run_dir=tmp_path / "ft")
    assert zeros_held(ft) == 1.0  # fine-tuned: the other weights moved, the pruned ones did not
    _, resumed = train_tiny("digits_mlp", f"trainer.init_from={r['run_dir']}", "trainer.steps=15",
                            f"trainer.resume={ft}", run_dir=tmp_path / "resumed")
    assert zeros_held(resumed) == 1.0
    manifest = json.load(open(os.path.join(export_run(resumed, formats=("onnx",)), "manifest.json")))
    p = manifest["pruning"]
    assert p["sparsity"] == 0.75 and p["zero_fraction"] == pytest.approx(0.75, abs=1e-3)
    assert p["files"]["model.onnx"]["compressed_bytes"] < p["files"]["model.onnx"]["bytes"] / 2
    from tests.entry import run_main

    code, _, err = run_main("experiments.prune", [f"run={dense}", "sparsity=1"], tmp_path)  # `python -m`, in-process
    assert code == 2 and "sparsity=1.0: must be in [0, 1)" in err and "Traceback" not in err
