"""A small convolutional net: [conv → norm → relu → pool] × len(channels) → dense → head. Inputs are NHWC."""

from dataclasses import dataclass, field
from functools import partial
from math import prod

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.errors import check, one_of
from mlsys.models.common import dense_init, dtype_of
from mlsys.models.family import Family, register
from mlsys.spec import DataSpec

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


def check_config(cfg: CNNConfig, data_cfg, platform: str) -> None:
    one_of("model.norm", cfg.norm, NORMS)
    one_of("model.pool", cfg.pool, POOLS)
    check(len(cfg.channels) > 0 and all(c > 0 for c in cfg.channels), "model.channels", cfg.channels,
          "must be a non-empty list of positive widths")
    check(len(getattr(data_cfg, "input_shape", [0, 0, 0])) == 3, "model", "cnn", "needs image inputs (H, W, C)")


def fits(cfg: CNNConfig, spec: DataSpec) -> str | None:
    if len(spec.input_shape) != 3:
        return (f"model=cnn needs image records (H, W, C), but each record has shape {spec.input_shape}; reshape "
                f"the inputs to (N, H, W, C) or use model=mlp")
    return None


def flops_per_example(cfg: CNNConfig, spec: DataSpec, n_params: int) -> float:
    """3x the forward's multiply-adds (x2 FLOPs): each convolution's kernel is applied at every position of its
    input, the dense layers once."""
    h, w, c = spec.input_shape
    macs = 0
    for ch in cfg.channels:
        macs += h * w * cfg.kernel_size**2 * c * ch
        h, w, c = (h // 2, w // 2, ch) if h > 1 and w > 1 else (h, w, ch)
    macs += h * w * c * cfg.hidden + cfg.hidden * spec.num_classes
    return 6.0 * macs


register(Family(name="cnn", config=CNNConfig, build=lambda cfg, spec, rngs: CNN(cfg, spec, rngs=rngs),
                task="classify", flops_per_example=flops_per_example, check=check_config, fits=fits,
                tensor_widths=lambda cfg: {"model.channels/hidden": [*cfg.channels, cfg.hidden]},
                mirrors={"torch": "mlsys.export.torch_mirror:CNN_MIRROR"}))
