"""model=custom: a model of your own, outside this package, built as it is written.

`model.target=pkg.module:Class` names an `nnx.Module` or a `flax.linen.Module`. The class is built from its signature:
`rngs` is injected (NNX); a parameter the data determines is filled from the DataSpec when model.kwargs does not give
it (DATA_ARGS: `in_features`, `num_classes`, ... or `spec` for models written for mlsys, also when its annotation is
DataSpec); everything else comes from `model.kwargs`. A Linen module is wrapped by mlsys/models/linen.py.
"""

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from math import prod
from typing import Any

from flax import linen, nnx

from mlsys.errors import ConfigError, check
from mlsys.models.family import Family, register
from mlsys.models.linen import TRAIN_ARGS, from_linen
from mlsys.spec import DataSpec


@dataclass
class CustomConfig:
    name: str = "custom"
    target: str = "???"  # "package.module:ClassName": an nnx.Module or a flax.linen.Module
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor arguments (the data fills DATA_ARGS)


# Constructor parameters the data determines, filled from the DataSpec unless model.kwargs gives them.
DATA_ARGS = {
    "in_features": lambda s: prod(s.input_shape),
    "num_features": lambda s: prod(s.input_shape),
    "input_shape": lambda s: tuple(s.input_shape),
    "num_classes": lambda s: s.num_classes,
    "out_features": lambda s: s.num_classes,
    "vocab_size": lambda s: s.num_classes,
    "spec": lambda s: s,
}
LINEN_FIELDS = ("parent", "name")  # set by Linen itself, never by a user


def import_target(target: str) -> type:
    """Resolve "package.module:ClassName" (or "package.module.ClassName") to an nnx.Module or linen.Module class."""
    module_name, _, attr = target.partition(":") if ":" in target else target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"model.target={target!r} cannot be imported ({e}); give 'package.module:ClassName' "
                          f"importable from the current directory or PYTHONPATH") from None
    except Exception as e:  # the user's module fails while it is imported (a syntax error, a failing statement)
        raise ConfigError(f"model.target={target!r}: importing {module_name!r} failed: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
    if not inspect.isclass(cls):
        raise ConfigError(f"model.target={target!r} is {cls!r}, not a class; name a flax.nnx.Module or "
                          f"flax.linen.Module subclass")
    if not issubclass(cls, (nnx.Module, linen.Module)):
        raise ConfigError(f"model.target={target!r} is {cls!r}, not a flax.nnx.Module or flax.linen.Module "
                          f"subclass")
    return cls


def parameters(cls: type) -> list[inspect.Parameter]:
    """The constructor's parameters as a user passes them (Linen: the dataclass fields but parent and name)."""
    if issubclass(cls, linen.Module):
        return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,  # a mode field is set per mode
                                  default=None if _has_default(f) or f.name in TRAIN_ARGS else inspect.Parameter.empty)
                for f in dataclasses.fields(cls) if f.init and f.name not in LINEN_FIELDS]
    return list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _is_spec(p: inspect.Parameter) -> bool:
    return p.annotation is DataSpec or p.annotation == "DataSpec"


def arguments(cfg: CustomConfig, cls: type, spec: DataSpec | None) -> dict[str, Any]:
    """The constructor's keyword arguments: model.kwargs, then what the data determines (`spec=None`: placeholders,
    for checking before the data is read); `rngs` is left to the caller. ConfigError names what is missing."""
    params = parameters(cls)
    given = dict(cfg.kwargs)
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"model.kwargs.{unknown[0]}: {cls.__name__} takes no argument {unknown[0]!r}; its "
                              f"arguments are {sorted(names - {'rngs'})}")
    args = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "rngs":
            continue
        if p.name in given:
            args[p.name] = given.pop(p.name)
        elif p.name in DATA_ARGS or _is_spec(p):
            fill = DATA_ARGS.get(p.name, DATA_ARGS["spec"])
            args[p.name] = fill(spec) if spec is not None else ...
        elif p.default is p.empty:
            raise ConfigError(f"model.target={cfg.target!r}: {cls.__name__} needs the argument {p.name!r}, which "
                              f"neither model.kwargs nor the data gives; set +model.kwargs.{p.name}=...")
    return {**args, **given}  # what is left goes to **kwargs


def _shown(args: dict) -> str:
    return ", ".join(f"{k}={'<DataSpec>' if isinstance(v, DataSpec) else repr(v)[:40]}" for k, v in args.items())


def build(cfg: CustomConfig, spec: DataSpec, rngs: nnx.Rngs) -> nnx.Module:
    cls = import_target(cfg.target)
    args = arguments(cfg, cls, spec)
    if issubclass(cls, linen.Module):
        return from_linen(cls, args, spec, rngs, cfg.target)
    takes_rngs = any(p.name == "rngs" or p.kind == p.VAR_KEYWORD for p in parameters(cls))
    try:
        return cls(**args, **({"rngs": rngs} if takes_rngs else {}))
    except Exception as e:  # one line, never a JAX traceback: the class, what it got, what it said
        raise ConfigError(f"model.target={cfg.target!r}: {cls.__name__}({_shown(args)}"
                          f"{', rngs' if takes_rngs else ''}) failed: {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None


def check_config(cfg: CustomConfig, data_cfg, platform: str) -> None:
    """Before the data is read: the target imports, is a Module class, and gets every argument it needs."""
    check(cfg.target not in ("", "???"), "model.target", cfg.target, "name your class, e.g. "
          "model.target=my_pkg.nets:TinyNet")
    arguments(cfg, import_target(cfg.target), None)


register(Family(name="custom", config=CustomConfig, build=build, check=check_config))
