"""Vision families (resnet, vit): every mesh the GPT tests use gives the single-device numbers (each mesh with one
of the two step kinds, alternating, to keep the suite short), shapes, FLOPs."""

import numpy as np
import pytest

from tests.test_mesh import MESHES, mesh_args, train_steps

RESNET = ["model=resnet", "data=digits", "model.depth=0", "model.stages=[1,1]", "model.width=8", "model.stem=small",
          "data.batch_size=16", "optim.warmup_steps=0"]
VIT = ["model=vit", "data=digits", "model.patch_size=4", "model.n_layer=2", "model.d_model=16", "model.n_head=4",
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
@pytest.mark.parametrize("family", ["resnet"])
def test_every_mesh_matches_one_device(family, shape, step):
    losses, params, _ = train_steps(FAMILIES[family] + mesh_args(shape) + [f"trainer.step={step}"], n=STEPS)
    base_losses, base_params = baseline(family)
    np.testing.assert_allclose(losses, base_losses, atol=1e-5, rtol=0)
    for got, want in zip(params, base_params):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
