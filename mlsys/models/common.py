"""What every model family shares: activations, dtypes, initialisers."""

import jax
import jax.numpy as jnp
from flax import nnx

# mlsys places every array itself (logical axis names → mesh rules → jit out_shardings), so Flax's eager
# sharding, which would demand a mesh whose axes are the logical names, stays off: models can then be built
# anywhere (tests, notebooks, export) with or without a mesh.
nnx.use_eager_sharding(False)

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def dense_init(names: tuple, std: float | None = None):
    """A kernel initialiser carrying logical axis names; the mesh rules in conf/mesh map them to devices."""
    init = nnx.initializers.lecun_normal() if std is None else nnx.initializers.normal(std)
    return nnx.with_partitioning(init, names)
