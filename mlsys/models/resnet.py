"""ResNet (He et al. 2016, the "v1.5" layout torchvision uses: the stride sits on the 3x3 conv of a bottleneck).

stem → stages of residual blocks (basic: two 3x3 convs; bottleneck: 1x1 → 3x3 → 1x1 with 4x wider output) →
global average pool → linear head. Batch norm after every conv; the last norm of each block starts at zero so
that every block starts as the identity (Goyal et al. 2017), which lets deep stacks train from the first step.
Inputs are NHWC images. `stem="small"` (one 3x3 conv, no pooling) suits tiny images such as 8x8 digits or 32x32
CIFAR; `stem="imagenet"` is the 7x7/2 conv and 3x3/2 max pool of the paper.
"""

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.errors import check, one_of
from mlsys.models.common import dense_init, dtype_of
from mlsys.models.family import Family, register
from mlsys.spec import DataSpec
from mlsys.parallel import constrain

# depth → (block, blocks per stage) of the paper's ImageNet models
DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
          101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}
BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass
class ResNetConfig:
    name: str = "resnet"
    depth: int = 18  # one of DEPTHS; 0 = the blocks given by `block` and `stages`
    block: str = "basic"  # one of BLOCKS (depth=0 only)
    stages: list[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage (depth=0 only)
    width: int = 64  # channels of the first stage; each later stage doubles them
    stem: str = "imagenet"  # one of STEMS
    bn_momentum: float = 0.9
    dropout: float = 0.0  # before the head
    dtype: str = "float32"
    param_dtype: str = "float32"


def layout(cfg: ResNetConfig) -> tuple[str, list[int]]:
    """(block kind, blocks per stage) the config describes."""
    return DEPTHS[cfg.depth] if cfg.depth else (cfg.block, list(cfg.stages))


def _conv(cin: int, cout: int, k: int, stride: int, cfg: ResNetConfig, rngs: nnx.Rngs) -> nnx.Conv:
    # He-normal init (fan_out, as torchvision) for convs followed by ReLU; input channels over fsdp, output
    # channels over tensor.
    init = nnx.with_partitioning(nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                 (None, None, "embed", "mlp"))
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding="SAME", use_bias=False, kernel_init=init,
                    dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), rngs=rngs)


def _norm(ch: int, cfg: ResNetConfig, rngs: nnx.Rngs, zero: bool = False) -> nnx.BatchNorm:
    return nnx.BatchNorm(ch, momentum=cfg.bn_momentum, dtype=dtype_of(cfg.dtype),
                         param_dtype=dtype_of(cfg.param_dtype), rngs=rngs,
                         scale_init=nnx.initializers.zeros if zero else nnx.initializers.ones)


class Block(nnx.Module):
    """One residual block: convs (+ norms) on the main path, a 1x1 conv shortcut where the shape changes."""

    def __init__(self, kind: str, cin: int, width: int, stride: int, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        cout = width * EXPANSION[kind]
        if kind == "basic":
            shapes = [(cin, width, 3, stride), (width, cout, 3, 1)]
        else:
            shapes = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        self.convs = nnx.List(_conv(*s, cfg, rngs) for s in shapes)
        self.norms = nnx.List(_norm(s[1], cfg, rngs, zero=i == len(shapes) - 1) for i, s in enumerate(shapes))
        project = stride != 1 or cin != cout
        self.short_conv = nnx.data(_conv(cin, cout, 1, stride, cfg, rngs) if project else None)
        self.short_norm = nnx.data(_norm(cout, cfg, rngs) if project else None)

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B h w D"]:
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = norm(conv(y))
            y = jax.nn.relu(y) if i < len(self.convs) - 1 else y
        short = x if self.short_conv is None else self.short_norm(self.short_conv(x))
        return constrain(jax.nn.relu(y + short), ("batch", None, None, "mlp"))


class ResNet(nnx.Module):
    def __init__(self, cfg: ResNetConfig, spec: DataSpec, *, rngs: nnx.Rngs):
        if len(spec.input_shape) != 3:
            raise ValueError(f"ResNet needs image inputs (H, W, C); the data gives shape {spec.input_shape}")
        kind, stages = layout(cfg)
        c = spec.input_shape[-1]
        self.small_stem = cfg.stem == "small"
        self.stem_conv = _conv(c, cfg.width, 3 if self.small_stem else 7, 1 if self.small_stem else 2, cfg, rngs)
        self.stem_norm = _norm(cfg.width, cfg, rngs)
        blocks, cin = [], cfg.width
        for i, n in enumerate(stages):
            width = cfg.width * 2 ** i
            for j in range(n):
                blocks.append(Block(kind, cin, width, 2 if i > 0 and j == 0 else 1, cfg, rngs=rngs))
                cin = width * EXPANSION[kind]
        self.blocks = nnx.List(blocks)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.head = nnx.Linear(cin, spec.num_classes, dtype=dtype_of(cfg.dtype),
                               param_dtype=dtype_of(cfg.param_dtype), rngs=rngs,
                               kernel_init=dense_init(("mlp", None)))

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B K"]:
        x = jax.nn.relu(self.stem_norm(self.stem_conv(x)))
        if not self.small_stem:
            x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
        for block in self.blocks:
            x = block(x)
        x = self.dropout(x.mean(axis=(1, 2)))  # global average pool
        return self.head(x).astype(jnp.float32)


def flops_per_example(cfg: ResNetConfig, spec: DataSpec, n_params: int = 0) -> float:
    """Training FLOPs per example: 3 x (2 x multiply-adds) of every conv and the head (forward, and a backward
    of twice the forward); norms, activations and pooling are left out, as in the usual counts."""
    h, w, c = spec.input_shape
    kind, stages = layout(cfg)

    def conv(hw, cin, cout, k, stride):
        out = (-(-hw[0] // stride), -(-hw[1] // stride))
        return out, out[0] * out[1] * k * k * cin * cout

    hw, macs = conv((h, w), c, cfg.width, 3 if cfg.stem == "small" else 7, 1 if cfg.stem == "small" else 2)
    if cfg.stem != "small":
        hw = (-(-hw[0] // 2), -(-hw[1] // 2))
    cin = cfg.width
    for i, n in enumerate(stages):
        width = cfg.width * 2 ** i
        for j in range(n):
            stride, cout = (2 if i > 0 and j == 0 else 1), width * EXPANSION[kind]
            shapes = ([(cin, width, 3, stride), (width, cout, 3, 1)] if kind == "basic" else
                      [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)])
            start = hw
            for s in shapes:
                hw, m = conv(hw, *s)
                macs += m
            if stride != 1 or cin != cout:
                macs += conv(start, cin, cout, 1, stride)[1]
            cin = cout
    macs += cin * spec.num_classes
    return float(3 * 2 * macs)


def check_config(cfg: ResNetConfig, data_cfg, platform: str) -> None:
    one_of("model.depth", cfg.depth, [0, *DEPTHS])
    one_of("model.block", cfg.block, BLOCKS)
    one_of("model.stem", cfg.stem, STEMS)
    check(len(cfg.stages) > 0 and all(n > 0 for n in cfg.stages), "model.stages", cfg.stages,
          "must be a non-empty list of positive block counts, e.g. [2,2,2,2]")
    check(cfg.width > 0, "model.width", cfg.width, "must be > 0, e.g. model.width=64")
    check(0 <= cfg.bn_momentum < 1, "model.bn_momentum", cfg.bn_momentum, "must be in [0, 1)")
    check(len(getattr(data_cfg, "input_shape", [0, 0, 0])) == 3, "model", "resnet", "needs image inputs (H, W, C)")


def fits(cfg: ResNetConfig, spec: DataSpec) -> str | None:
    if len(spec.input_shape) != 3:
        return (f"model=resnet needs image records (H, W, C), but each record has shape {spec.input_shape}; "
                f"reshape the inputs to (N, H, W, C) or use model=mlp")
    return None


register(Family(name="resnet", config=ResNetConfig, build=lambda cfg, spec, rngs: ResNet(cfg, spec, rngs=rngs),
                task="classify", flops_per_example=flops_per_example, check=check_config, fits=fits,
                # every stage's width is a multiple of the first: tensor parallelism splits them all evenly
                tensor_widths=lambda cfg: {"model.width": [cfg.width]}))
