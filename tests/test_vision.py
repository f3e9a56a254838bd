"""Vision families: every mesh the GPT tests use gives the single-device numbers (each mesh with one of the two step
kinds, alternating, to keep the suite short); sizes and FLOPs against the published models; bad configs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys import data
from mlsys.config import validate
from mlsys.errors import ConfigError, DataError
from mlsys.models.family import check_fits
from mlsys.models.resnet import ResNet, ResNetConfig, flops_per_example as resnet_flops
from mlsys.models.vit import ViT, ViTConfig, flops_per_example as vit_flops
from mlsys.spec import DataSpec
from tests.conftest import image_folder, typed_cfg
from tests.test_mesh import MESHES, mesh_args, train_steps

RESNET = ["model=resnet", "data=digits", "model.depth=0", "model.stages=[1,1]", "model.width=8", "model.stem=small",
          "data.batch_size=16", "optim.warmup_steps=0"]
VIT = ["model=vit", "data=digits", "model.patch_size=4", "model.n_layer=2", "model.d_model=16", "model.n_head=4",
       "data.batch_size=16", "optim.warmup_steps=0"]
FAMILIES = {"resnet": RESNET, "vit": VIT}
STEPS = 2
_baselines = {}


def baseline(family):
    if family not in _baselines:
        _baselines[family] = train_steps(FAMILIES[family] + mesh_args((1, 1, 1)), n=STEPS)[:2]
    return _baselines[family]


@pytest.mark.parametrize("shape, step", [(s, ("jit", "shard_map")[i % 2]) for i, s in enumerate(MESHES)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_mesh_matches_one_device(family, shape, step):
    """Batch norm included: the shard_map step normalises with the global batch's statistics, as jit does."""
    losses, params, _ = train_steps(FAMILIES[family] + mesh_args(shape) + [f"trainer.step={step}"], n=STEPS)
    base_losses, base_params = baseline(family)
    np.testing.assert_allclose(losses, base_losses, atol=1e-5, rtol=0)
    for got, want in zip(params, base_params):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_resnet_matches_torchvision_sizes():
    spec = DataSpec("classify", (224, 224, 3), "float32", 1000)
    for depth, params, gmacs in [(18, 11_689_512, 1.814), (50, 25_557_032, 4.089)]:
        m = nnx.eval_shape(lambda: ResNet(ResNetConfig(depth=depth), spec, rngs=nnx.Rngs(0)))
        assert sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param))) == params
        assert abs(resnet_flops(ResNetConfig(depth=depth), spec) / 6e9 - gmacs) < 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["model=resnet", "model.depth=20"], r"model.depth=20: must be one of \[0, 18, 34, 50, 101, 152\]"),
    (["model=resnet", "model.stem=tiny"], r"model.stem='tiny': must be one of \['imagenet', 'small'\]"),
    (["model=resnet", "data=images", "data.path=x", "data.augment=[rotate]"], "data.augment='rotate': must be one of"),
    (["model=resnet", "data=images", "data.path=x", "data.crop_scale=[0.5,2]"], r"data.crop_scale=\[0.5, 2.0\]"),
    (["model=resnet", "data=hf", "data.path=x", "data.format=xml"], "data.format='xml': must be one of"),
])
def test_bad_vision_configs_fail_before_compiling(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(typed_cfg(overrides), n_devices=8)


@pytest.mark.slow
def test_vit_exports_to_onnx_with_parity_and_serves(train_tiny, tmp_path, monkeypatch):
    from mlsys.export import export_run
    from mlsys.export.onnx_export import ort_run, ort_session
    from mlsys.serve.config import ServeConfig
    from mlsys.serve.model import ServedModel

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # a signing key of the test's own
    _, run_dir = train_tiny("digits_vit", "model.pool=cls", "model.dropout=0.1")
    out = export_run(run_dir, formats=("onnx",), out=str(tmp_path / "export"))
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["family"] == "vit" and m["parity"]["onnx_max_abs_diff"] <= 1e-4
    assert m["onnx"]["inputs"][0]["shape"] == ["B", 8, 8, 1]
    x = np.random.default_rng(0).random((3, 8, 8, 1), np.float32)
    served = ServedModel(ServeConfig(model=out))
    np.testing.assert_allclose(served.run(x), ort_run(ort_session(os.path.join(out, "model.onnx")), x), atol=1e-6)


def test_vit_shapes_pools_flops_and_scanned_layers():
    cfg = ViTConfig(patch_size=2, n_layer=3, d_model=16, n_head=2)
    spec = DataSpec("classify", (8, 8, 1), "float32", 10)
    x = jnp.ones((2, 8, 8, 1))
    for pool, scan in [("cls", True), ("mean", False)]:
        m = ViT(ViTConfig(patch_size=2, n_layer=3, d_model=16, n_head=2, pool=pool, scan_layers=scan), spec,
                rngs=nnx.Rngs(0))
        assert m(x).shape == (2, 10)
    scanned = nnx.get_partition_spec(nnx.state(ViT(cfg, spec, rngs=nnx.Rngs(0)), nnx.Param))
    assert tuple(scanned["blocks"]["attn"]["qkv"]["kernel"].get_value()) == (None, "embed", "heads")  # layer axis
    # ViT-B/16 at 224: 86.6M parameters, 17.6 GMACs forward (the paper's figures)
    big = nnx.eval_shape(lambda: ViT(ViTConfig(patch_size=16, n_layer=12, n_head=12, d_model=768),
                                     DataSpec("classify", (224, 224, 3), "float32", 1000), rngs=nnx.Rngs(0)))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(big, nnx.Param))) == 86_567_656
    flops = vit_flops(ViTConfig(patch_size=16, n_layer=12, n_head=12, d_model=768),
                      DataSpec("classify", (224, 224, 3), "float32", 1000))
    assert abs(flops / 6 - 17.56e9) < 0.01e9


@pytest.mark.parametrize("overrides, message", [
    (["model=vit", "data=images", "data.path=x", "data.image_size=30", "model.patch_size=4"],
     r"data.image_size=30: the 30x30 images do not split into 4x4 patches; make data.image_size a multiple of "
     r"model.patch_size=4 \(e.g. 28\)"),
    (["model=vit", "model.patch_size=3"], "model.patch_size=3: the 8x8 images do not split into 3x3 patches"),
])
def test_bad_vit_configs_fail_before_compiling(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(typed_cfg(overrides), n_devices=8)


def test_images_not_divisible_by_the_patch_size_when_only_the_files_know():
    """data.image_size=0 (as stored): the check runs once the data is read, before compiling."""
    cfg = typed_cfg(["model=vit", "model.patch_size=5", "data=images", f"data.path={image_folder()}"])
    validate(cfg, n_devices=8)
    with pytest.raises(DataError, match="the images are 16x16, not divisible by model.patch_size=5"):
        check_fits(cfg.model, data.load(cfg.data, 0).spec, cfg.data)
