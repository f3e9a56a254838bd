"""A small convolutional net: [conv → norm → relu → pool] × len(channels) → dense → head. Inputs are NHWC."""

from dataclasses import dataclass, field
from functools import partial
from math import prod

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.models.common import DataSpec, dense_init, dtype_of

NORMS = ("batch", "layer", "none")
POOLS = ("max", "avg")


@dataclass
class CNNConfig:
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    norm: str = "batch"  # one of NORMS
    pool: str = "max"  # one of POOLS; a 2x2 window after each block while the image is larger than 1x1
    hidden: int = 128
    dropout: float = 0.0
    dtype: str = "float32"
    param_dtype: str = "float32"


class CNN(nnx.Module):
    def __init__(self, cfg: CNNConfig, spec: DataSpec, *, rngs: nnx.Rngs):
        if len(spec.input_shape) != 3:
            raise ValueError(f"CNN needs image inputs (H, W, C); the data gives shape {spec.input_shape}")
        h, w, c = spec.input_shape
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        ks = (cfg.kernel_size, cfg.kernel_size)
        self.convs, self.norms, self.pooled = nnx.List(), nnx.List(), []
        for ch in cfg.channels:
            self.convs.append(nnx.Conv(c, ch, ks, padding="SAME", dtype=dt, param_dtype=pdt, rngs=rngs,
                                       kernel_init=dense_init((None, None, None, "mlp"))))
            if cfg.norm == "batch":
                self.norms.append(nnx.BatchNorm(ch, momentum=0.9, dtype=dt, param_dtype=pdt, rngs=rngs))
            elif cfg.norm == "layer":
                self.norms.append(nnx.LayerNorm(ch, dtype=dt, param_dtype=pdt, rngs=rngs))
            else:
                self.norms.append(None)
            pool = h > 1 and w > 1
            self.pooled.append(pool)
            h, w, c = (h // 2, w // 2, ch) if pool else (h, w, ch)
        self.fc = nnx.Linear(h * w * c, cfg.hidden, dtype=dt, param_dtype=pdt, rngs=rngs,
                             kernel_init=dense_init(("embed", "mlp")))
        self.head = nnx.Linear(cfg.hidden, spec.num_classes, dtype=dt, param_dtype=pdt, rngs=rngs,
                               kernel_init=dense_init(("mlp", None)))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        # nnx.avg_pool/max_pool need window_shape/strides as keywords.
        pool_fn = nnx.max_pool if cfg.pool == "max" else nnx.avg_pool
        self.pool = partial(pool_fn, window_shape=(2, 2), strides=(2, 2))

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B K"]:
        for conv, norm, pooled in zip(self.convs, self.norms, self.pooled):
            x = conv(x)
            x = jax.nn.relu(norm(x) if norm is not None else x)
            x = self.pool(x) if pooled else x
        x = x.reshape(x.shape[0], prod(x.shape[1:]))
        x = self.dropout(jax.nn.relu(self.fc(x)))
        return self.head(x).astype(jnp.float32)
