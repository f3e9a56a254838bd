"""The model-family protocol: a family registered from outside the loop (here, from this test) trains, is checked
and reports MFU without any change to the loop, export or validation code."""

import json
import os
from dataclasses import dataclass

import pytest
from flax import nnx

from mlsys.config import register as register_schemas
from mlsys.errors import ConfigError, check
from mlsys.models import REGISTRY, Family, register
from mlsys.validate import validate
from tests.conftest import typed_cfg


@dataclass
class ToyConfig:
    name: str = "toy"
    width: int = 8


class Toy(nnx.Module):
    def __init__(self, cfg: ToyConfig, spec, *, rngs: nnx.Rngs):
        n = 1
        for s in spec.input_shape:
            n *= s
        self.fc = nnx.Linear(n, cfg.width, rngs=rngs)
        self.out = nnx.Linear(cfg.width, spec.num_classes, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


def check_toy(cfg: ToyConfig, data_cfg, platform: str) -> None:
    check(cfg.width > 0, "model.width", cfg.width, "must be > 0")


@pytest.fixture
def toy():
    register(Family(name="toy", config=ToyConfig, build=lambda cfg, spec, rngs: Toy(cfg, spec, rngs=rngs),
                    task="classify", flops_per_example=lambda cfg, spec, n: 6.0 * n, check=check_toy))
    register_schemas()  # stores toy_schema in Hydra's ConfigStore: selectable as model=toy_schema
    yield
    del REGISTRY["toy"]


def test_a_family_registered_outside_the_loop_trains(toy, train_tiny):
    with pytest.raises(ConfigError, match="model.width=0: must be > 0"):
        validate(typed_cfg(["model=toy_schema", "model.width=0"]), 1)
    with pytest.raises(ConfigError, match="model='toy': classifies, but data=text is a language-modelling task"):
        validate(typed_cfg(["model=toy_schema", "data=text"]), 1)
    results, run_dir = train_tiny(None, "model=toy_schema", "model.width=16", "trainer.steps=4",
                                  "trainer.log_every=2")
    assert results["test"]["accuracy"] > 0
    row = json.loads(open(os.path.join(run_dir, "metrics.jsonl")).readline())
    env = json.load(open(os.path.join(run_dir, "env.json")))
    assert env["flops_per_example"] == 6.0 * env["n_params"] and 0 < row["mfu"] < 1


@dataclass
class LateConfig:
    name: str = "late"


def test_schemas_are_stored_once_and_a_late_family_at_the_next_call(monkeypatch):
    """register_schemas runs before every compose: what is already in the ConfigStore is not stored again (it costs
    a structured-config conversion per schema), but a family registered since is."""
    from hydra.core.config_store import ConfigStore

    register_schemas()
    cs, stored = ConfigStore.instance(), []
    store = cs.store
    monkeypatch.setattr(cs, "store", lambda **kw: (stored.append(kw["name"]), store(**kw)))
    register_schemas()
    assert stored == []
    register(Family(name="late", config=LateConfig, build=lambda cfg, spec, rngs: None, task="classify"))
    try:
        register_schemas()
        register_schemas()
    finally:
        del REGISTRY["late"]
    assert stored == ["late_schema"] and cs.load("model/late_schema.yaml").node.name == "late"
