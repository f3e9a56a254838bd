"""Linen modules trained as NNX ones, through flax.nnx.bridge.

`LinenModel` wraps a `flax.linen.Module` in `nnx.bridge.ToNNX` and initialises it lazily on a sample batch shaped
by the DataSpec: its "params" become nnx.Param (trained), its other collections (batch_stats, ...) the model's other
state. Training and evaluation mode, set by nnx.view like every NNX Dropout/BatchNorm, reach the Linen module through
the boolean that mlsys recognises (TRAIN_ARGS: `train`, `training`, `is_training`, or `deterministic`, inverted):
an argument of its `__call__` (flax's examples), else a field of the module (cloned per mode); in training mode its
non-parameter collections are mutable (batch statistics update).
"""

import dataclasses

import inspect

import jax.numpy as jnp
from flax import linen, nnx
from jaxtyping import Array

from mlsys.errors import ConfigError
from mlsys.spec import DataSpec

TRAIN_ARGS = {"train": True, "training": True, "is_training": True, "deterministic": False}  # value in training


def train_arg(cls: type) -> str | None:
    """The `__call__` argument through which the Linen module takes training/evaluation mode, if any."""
    params = inspect.signature(cls.__call__).parameters
    return next((name for name in TRAIN_ARGS if name in params), None)


def train_field(cls: type) -> str | None:
    """The dataclass field through which the Linen module takes the mode, if it has no such argument."""
    names = {f.name for f in dataclasses.fields(cls)}
    return next((name for name in TRAIN_ARGS if name in names), None)


def mode_value(name: str, training: bool) -> bool:
    return training if TRAIN_ARGS[name] else not training


class LinenModel(nnx.Module):
    """A Linen module as an NNX module: `model(x)` runs it in the mode nnx.view set (training by default)."""

    def __init__(self, module: linen.Module, sample: Array, *, rngs: nnx.Rngs):
        self.linen = nnx.bridge.ToNNX(module, rngs=rngs)
        self.mode_arg = train_arg(type(module))
        self.mode_field = None if self.mode_arg else train_field(type(module))
        self._set_mode(training=False)  # initialised in evaluation mode: no dropout key needed, statistics created
        nnx.bridge.lazy_init(self.linen, sample, **self._mode())
        # Collections the module writes in training mode (batch statistics), known once it is initialised.
        written = nnx.state(self.linen, nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.RngState)))
        self.mutable = tuple(sorted({nnx.variable_name_from_type(type(v)) for _, v in nnx.to_flat_state(written)}))
        self._set_mode(training=True)

    def set_view(self, deterministic: bool | None = None, use_running_average: bool | None = None):
        """For nnx.view(model, deterministic=..., use_running_average=...): evaluation mode when either is True."""
        for value in (deterministic, use_running_average):
            if value is not None:
                self._set_mode(training=not value)

    def _set_mode(self, training: bool) -> None:
        self.deterministic = not training
        if self.mode_field:  # static, like the attributes nnx.view sets: train and eval graphs differ
            inner = self.linen.to_nnx__module
            self.linen.to_nnx__module = inner.clone(**{self.mode_field: mode_value(self.mode_field, training)})

    def _mode(self) -> dict:
        return {self.mode_arg: mode_value(self.mode_arg, not self.deterministic)} if self.mode_arg else {}

    def __call__(self, x: Array) -> Array:
        if self.deterministic:  # no RNG draws and nothing written: the evaluation graph stays pure (ONNX export)
            return self.linen(x, rngs={}, mutable=False, **self._mode())
        return self.linen(x, mutable=list(self.mutable) or False, **self._mode())


def from_linen(cls: type, args: dict, spec: DataSpec, rngs: nnx.Rngs, target: str) -> LinenModel:
    """Build the Linen module from `args` and initialise it on a zero batch of one example shaped by `spec`."""
    field = None if train_arg(cls) else train_field(cls)
    if field and field not in args:  # a mode field without a default: mlsys sets it per mode anyway
        args = {**args, field: mode_value(field, training=False)}
    shown = ", ".join(f"{k}={repr(v)[:40]}" for k, v in args.items())
    try:
        module = cls(**args)
        sample = jnp.zeros((1, *spec.input_shape), spec.input_dtype)
        return LinenModel(module, sample, rngs=rngs)
    except Exception as e:  # one line naming the class, its arguments and the error, never a JAX traceback
        raise ConfigError(f"model.target={target!r}: {cls.__name__}({shown}) failed (Linen, initialised on inputs "
                          f"of shape {(1, *spec.input_shape)}): {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
