"""The model-family protocol: everything mlsys needs to know about a kind of model, declared in one place.

The loop, export and serving never branch on a model's name; they ask its `Family`. A family lives in its own file
(mlsys/models/mlp.py, ...), which ends with `register(Family(...))`; mlsys/models/__init__.py imports the file.

To add a family `yours`:
  1. mlsys/models/yours.py: a config dataclass whose first field is `name: str = "yours"`, an nnx.Module, and at
     the bottom `register(Family(name="yours", config=YoursConfig, build=lambda cfg, spec, rngs: Yours(cfg, spec,
     rngs=rngs), task="classify", flops_per_example=..., check=...))`.
  2. import it in mlsys/models/__init__.py (that import registers it).
  3. conf/model/yours.yaml: `defaults: [yours_schema, _self_]` (the schema is stored under that name).
Everything else is optional: `check` for the config's own keys (ranges, names; one ConfigError line each),
`tensor_widths` for tensor parallelism, `fits` for what only the loaded data can tell, `max_len` for sequence
models, `mirrors` for export formats besides ONNX (e.g. {"torch": "mlsys.export.torch_mirror:MLP_MIRROR"}, imported
only when that export runs, so that torch stays optional).
"""

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from flax import nnx

from mlsys.errors import ConfigError, DataError
from mlsys.spec import DataSpec


def _no_max_len(cfg) -> None:
    return None


@dataclass(frozen=True)
class Family:
    name: str  # model=<name>; also the config dataclass's `name` default
    config: type  # the config dataclass (Hydra schema `<name>_schema`)
    build: Callable[[Any, DataSpec, nnx.Rngs], nnx.Module]  # (model config, data spec, rngs) -> module
    task: str | None = None  # "classify", "lm", or None (any task: decided by the model itself)
    # Training FLOPs of one example (forward + backward), for MFU: (model config, data spec, parameter count).
    flops_per_example: Callable[[Any, DataSpec, int], float] | None = None
    # Checks of the model's config keys before anything is built: (model config, data config, platform) -> None,
    # raising ConfigError (mlsys.errors.check / one_of) naming the key, the value and a fix.
    check: Callable[[Any, Any, str], None] | None = None
    # Widths that tensor parallelism splits: {"model.key": [widths]}; each must divide by the tensor size.
    tensor_widths: Callable[[Any], dict[str, list[int]]] | None = None
    # What only the loaded data can tell: (model config, data spec) -> a problem ("needs image records ...") or None.
    fits: Callable[[Any, DataSpec], str | None] | None = None
    max_len: Callable[[Any], int | None] = _no_max_len  # the longest sequence the model accepts (None: any)
    mirrors: dict[str, str] = field(default_factory=dict)  # export format -> "module:attribute" of its mirror

    def mirror(self, fmt: str):
        """The export mirror for `fmt` (imported now), or None when the family has none."""
        target = self.mirrors.get(fmt)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `model=<family.name>` available (its config schema is stored by mlsys.config.register)."""
    if getattr(family.config, "name", None) != family.name:
        raise ValueError(f"{family.config.__name__}.name must default to {family.name!r}")
    REGISTRY[family.name] = family
    return family


def family_of(model_cfg) -> Family:
    """The family a model config belongs to."""
    try:
        return REGISTRY[model_cfg.name]
    except KeyError:
        raise ConfigError(f"model.name={model_cfg.name!r}: no such model family; select one with model=NAME, NAME in "
                          f"{sorted(REGISTRY)}") from None


def build_model(cfg, spec: DataSpec, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiate the model a config describes, for data described by `spec`."""
    return family_of(cfg).build(cfg, spec, rngs)


def check_fits(model_cfg, spec: DataSpec, data_cfg) -> None:
    """What the config checks cannot know before the data is read: its records against the model (DataError)."""
    family = family_of(model_cfg)
    problem = family.fits(model_cfg, spec) if family.fits else None
    if problem:
        raise DataError(f"data.path={getattr(data_cfg, 'path', data_cfg.name)!r}: {problem}")
