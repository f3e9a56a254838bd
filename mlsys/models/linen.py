"""Linen modules trained as NNX ones, through flax.nnx.bridge.

`LinenModel` wraps a `flax.linen.Module` in `nnx.bridge.ToNNX` and initialises it lazily on a sample batch shaped
by the DataSpec: its "params" become nnx.Param (trained), its other collections (batch_stats, ...) the model's other
state. Training and evaluation mode reach the Linen module as the boolean argument of its `__call__` that mlsys
recognises (TRAIN_ARGS: `train`, `training`, `is_training`, or `deterministic`, inverted), set by nnx.view like
every NNX Dropout/BatchNorm; in training mode its non-parameter collections are mutable (batch statistics update).
"""

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


class LinenModel(nnx.Module):
    """A Linen module as an NNX module: `model(x)` runs it in the mode nnx.view set (training by default)."""

    def __init__(self, module: linen.Module, sample: Array, *, rngs: nnx.Rngs):
        self.linen = nnx.bridge.ToNNX(module, rngs=rngs)
        self.mode_arg = train_arg(type(module))
        self.deterministic = True  # initialised in evaluation mode: no dropout key needed, statistics created
        nnx.bridge.lazy_init(self.linen, sample, **self._mode())
        # Collections the module writes in training mode (batch statistics), known once it is initialised.
        written = nnx.state(self.linen, nnx.All(nnx.Not(nnx.Param), nnx.Not(nnx.RngState)))
        self.mutable = tuple(sorted({nnx.variable_name_from_type(type(v)) for _, v in nnx.to_flat_state(written)}))
        self.deterministic = False

    def set_view(self, deterministic: bool | None = None, use_running_average: bool | None = None):
        """For nnx.view(model, deterministic=..., use_running_average=...): evaluation mode when either is True."""
        for value in (deterministic, use_running_average):
            if value is not None:
                self.deterministic = value

    def _mode(self) -> dict:
        if self.mode_arg is None:
            return {}
        training = not self.deterministic
        return {self.mode_arg: training if TRAIN_ARGS[self.mode_arg] else not training}

    def __call__(self, x: Array) -> Array:
        if self.deterministic:  # no RNG draws and nothing written: the evaluation graph stays pure (ONNX export)
            return self.linen(x, rngs={}, mutable=False, **self._mode())
        return self.linen(x, mutable=list(self.mutable) or False, **self._mode())


def from_linen(cls: type, args: dict, spec: DataSpec, rngs: nnx.Rngs, target: str) -> LinenModel:
    """Build the Linen module from `args` and initialise it on a zero batch of one example shaped by `spec`."""
    shown = ", ".join(f"{k}={repr(v)[:40]}" for k, v in args.items())
    try:
        module = cls(**args)
        sample = jnp.zeros((1, *spec.input_shape), spec.input_dtype)
        return LinenModel(module, sample, rngs=rngs)
    except Exception as e:  # one line naming the class, its arguments and the error, never a JAX traceback
        raise ConfigError(f"model.target={target!r}: {cls.__name__}({shown}) failed (Linen, initialised on inputs "
                          f"of shape {(1, *spec.input_shape)}): {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0][:300]}") from None
