"""The model registry: `model.name` → (config dataclass, NNX module class).

A model of your own, outside this package, trains too: select `model=custom` and name its class by import path,
`model.target=my_pkg.nets:TinyNet`, with its keyword arguments under `model.kwargs`. It is built as
`TinyNet(spec, rngs=rngs, **kwargs)` and called as `model(inputs)`; see the README.
"""

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from flax import nnx

from mlsys.errors import ConfigError
from mlsys.models.cnn import CNN, CNNConfig
from mlsys.models.common import DataSpec
from mlsys.models.gpt import GPT, GPTConfig
from mlsys.models.mlp import MLP, MLPConfig


@dataclass
class CustomConfig:
    name: str = "custom"
    target: str = "???"  # "package.module:ClassName"
    kwargs: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, tuple[type, type | None]] = {
    "mlp": (MLPConfig, MLP),
    "cnn": (CNNConfig, CNN),
    "gpt": (GPTConfig, GPT),
    "custom": (CustomConfig, None),
}


def import_target(target: str) -> type:
    """Resolve "package.module:ClassName" (or "package.module.ClassName") to an nnx.Module subclass."""
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"model.target={target!r} cannot be imported ({e}); give 'package.module:ClassName' "
                          f"importable from the current directory or PYTHONPATH") from None
    if not (inspect.isclass(cls) and issubclass(cls, nnx.Module)):
        raise ConfigError(f"model.target={target!r} is {cls!r}, not a flax.nnx.Module subclass")
    return cls


def build_model(cfg, spec: DataSpec, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiate the model a config describes, for data described by `spec`."""
    if cfg.name == "custom":
        return import_target(cfg.target)(spec, rngs=rngs, **dict(cfg.kwargs))
    return REGISTRY[cfg.name][1](cfg, spec, rngs=rngs)


__all__ = ["REGISTRY", "DataSpec", "build_model", "import_target", "MLP", "CNN", "GPT",
           "MLPConfig", "CNNConfig", "GPTConfig", "CustomConfig"]
