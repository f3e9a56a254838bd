"""Vision families: every mesh the GPT tests use gives the single-device numbers (each mesh with one of the two step
kinds, alternating, to keep the suite short); sizes and FLOPs against the published models; bad configs."""

import jax
import numpy as np
import pytest
from flax import nnx

from mlsys.config import validate
from mlsys.errors import ConfigError
from mlsys.models.resnet import ResNet, ResNetConfig, flops_per_example as resnet_flops
from mlsys.spec import DataSpec
from tests.conftest import typed_cfg
from tests.test_mesh import MESHES, mesh_args, train_steps

RESNET = ["model=resnet", "data=digits", "model.depth=0", "model.stages=[1,1]", "model.width=8", "model.stem=small",
          "data.batch_size=16", "optim.warmup_steps=0"]
FAMILIES = {"resnet": RESNET}
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
