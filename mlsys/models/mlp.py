"""A multi-layer perceptron for flat or image inputs (flattened)."""

from dataclasses import dataclass, field
from math import prod

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.errors import check, one_of
from mlsys.models.common import ACTIVATIONS, dense_init, dtype_of
from mlsys.models.family import Family, register
from mlsys.parallel import constrain
from mlsys.spec import DataSpec


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


def check_config(cfg: MLPConfig, data_cfg, platform: str) -> None:
    one_of("model.activation", cfg.activation, ACTIVATIONS)
    check(all(h > 0 for h in cfg.hidden), "model.hidden", cfg.hidden, "every width must be > 0")


def flops_per_example(cfg: MLPConfig, spec: DataSpec, n_params: int) -> float:
    """6N: a multiply and an add per weight, forward, and twice that backward (every parameter is a matmul weight
    used once per example, up to the biases)."""
    return 6.0 * n_params


register(Family(name="mlp", config=MLPConfig, build=lambda cfg, spec, rngs: MLP(cfg, spec, rngs=rngs),
                task="classify", flops_per_example=flops_per_example, check=check_config,
                tensor_widths=lambda cfg: {"model.hidden": list(cfg.hidden)},
                mirrors={"torch": "mlsys.export.torch_mirror:MLP_MIRROR"}))
