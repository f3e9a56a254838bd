"""A multi-layer perceptron for flat or image inputs (flattened)."""

from dataclasses import dataclass, field
from math import prod

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.models.common import ACTIVATIONS, DataSpec, dense_init, dtype_of
from mlsys.parallel import constrain


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 128])
    activation: str = "relu"  # one of ACTIVATIONS
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"


class MLP(nnx.Module):
    def __init__(self, cfg: MLPConfig, spec: DataSpec, *, rngs: nnx.Rngs):
        dims = [prod(spec.input_shape), *cfg.hidden]
        # Logical axis names alternate so that no kernel names one axis twice (embed→mlp→embed→...).
        names = ["embed" if i % 2 == 0 else "mlp" for i in range(len(dims))]
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.layers = nnx.List(
            nnx.Linear(dims[i], dims[i + 1], dtype=dt, param_dtype=pdt, rngs=rngs,
                       kernel_init=dense_init((names[i], names[i + 1])))
            for i in range(len(cfg.hidden))
        )
        self.head = nnx.Linear(dims[-1], spec.num_classes, dtype=dt, param_dtype=pdt, rngs=rngs,
                               kernel_init=dense_init((names[-1], None)))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.act = ACTIVATIONS[cfg.activation]
        self.names = names

    def __call__(self, x: Float[Array, "B *feat"]) -> Float[Array, "B C"]:
        x = x.reshape(x.shape[0], -1)
        for layer, name in zip(self.layers, self.names[1:]):
            x = constrain(self.dropout(self.act(layer(x))), ("batch", name))
        return self.head(x).astype(jnp.float32)
