"""Vision Transformer (Dosovitskiy et al. 2021): the image cut into patch_size x patch_size patches, each flattened
and projected to d_model, a learned position embedding (plus a class token with pool="cls"), the pre-norm
transformer blocks the language models use (mlsys.models.transformer) with bidirectional attention, stacked and
scanned, a final norm, and a linear head on the class token or on the mean of the patch tokens."""

from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from mlsys.errors import check, one_of
from mlsys.models.common import dense_init, dtype_of
from mlsys.models.family import Family, register
from mlsys.models.stack import run_blocks, stack_modules
from mlsys.models.transformer import ATTENTION, REMAT, Block, TransformerConfig, ffn_width
from mlsys.parallel import constrain
from mlsys.spec import DataSpec

POOLS = ("cls", "mean")


@dataclass
class ViTConfig:
    name: str = "vit"
    patch_size: int = 4  # the image side must be a multiple of it
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0  # 0 = 4 x d_model
    pool: str = "cls"  # one of POOLS: a class token, or the mean of the patch tokens
    dropout: float = 0.0
    norm_eps: float = 1e-6
    scan_layers: bool = True  # blocks stacked and run under lax.scan: compile time independent of depth
    remat: str = "none"  # one of REMAT, applied to every block
    attention: str = "auto"  # jax.nn.dot_product_attention implementation (auto, xla, cudnn)
    dtype: str = "float32"
    param_dtype: str = "float32"


def block_config(cfg: ViTConfig) -> TransformerConfig:
    """The shared blocks' settings: GELU MLP, LayerNorm with biases, as ViT."""
    return TransformerConfig(name="vit", n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model, d_ff=cfg.d_ff,
                             norm="layer", mlp="gelu", bias=True, dropout=cfg.dropout, norm_eps=cfg.norm_eps,
                             dtype=cfg.dtype, param_dtype=cfg.param_dtype, attention=cfg.attention,
                             remat=cfg.remat, scan_layers=cfg.scan_layers)


class ViT(nnx.Module):
    def __init__(self, cfg: ViTConfig, spec: DataSpec, *, rngs: nnx.Rngs):
        if len(spec.input_shape) != 3:
            raise ValueError(f"ViT needs image inputs (H, W, C); the data gives shape {spec.input_shape}")
        h, w, c = spec.input_shape
        p, d = cfg.patch_size, cfg.d_model
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not divisible by model.patch_size={p}")
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.patch, self.grid, self.pool = p, (h // p, w // p), cfg.pool
        tokens = self.grid[0] * self.grid[1] + (cfg.pool == "cls")
        self.embed = nnx.Linear(p * p * c, d, dtype=dt, param_dtype=pdt, rngs=rngs,
                                kernel_init=dense_init((None, "embed")))
        self.cls = nnx.data(nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, (None, None, "embed"))(
            rngs.params(), (1, 1, d), pdt)) if cfg.pool == "cls" else None)
        self.pos = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))(
            rngs.params(), (tokens, d), pdt))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        bcfg = block_config(cfg)
        blocks = [Block(bcfg, rngs=rngs) for _ in range(cfg.n_layer)]
        self.blocks = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.remat_policy, self.remat = REMAT[cfg.remat], cfg.remat != "none"
        self.unroll_layers = False  # True (nnx.view at export): a scanned stack runs as a Python loop
        self.ln_f = nnx.LayerNorm(d, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.head = nnx.Linear(d, spec.num_classes, dtype=dt, param_dtype=pdt, rngs=rngs,
                               kernel_init=dense_init(("embed", None), 0.02))
        self.dtype = dt

    def set_view(self, unroll_layers: bool | None = None):
        """For nnx.view(model, unroll_layers=True) (ONNX export)."""
        if unroll_layers is not None:
            self.unroll_layers = unroll_layers

    def patches(self, x: Float[Array, "B H W C"]) -> Float[Array, "B N P"]:
        """Non-overlapping patches, each flattened (row, column, channel)."""
        b, (gh, gw), p = x.shape[0], self.grid, self.patch
        x = x.reshape(b, gh, p, gw, p, x.shape[-1]).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, gh * gw, p * p * x.shape[-1])

    def __call__(self, x: Float[Array, "B H W C"]) -> Float[Array, "B K"]:
        x = self.embed(self.patches(x.astype(self.dtype)))
        if self.cls is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1])), x], 1)
        x = constrain(self.dropout(x + self.pos[...].astype(x.dtype)[None]), ("batch", "seq", "embed"))
        t = x.shape[1]
        mask = jnp.ones((1, 1, t, t), bool)  # every token sees every token
        draws = self.dropout.rate > 0 and not self.dropout.deterministic
        x, _ = run_blocks(self.blocks, x, (None, mask, None), None, self.remat_policy, self.remat,
                          self.unroll_layers, draws)
        x = self.ln_f(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return self.head(x).astype(jnp.float32)


def flops_per_example(cfg: ViTConfig, spec: DataSpec, n_params: int = 0) -> float:
    """Training FLOPs per example, 3 x the forward's (the backward costs twice the forward): 2 FLOPs per
    multiply-add of the patch projection, every block's matmuls (4·D² for attention's projections, 2·D·F for the
    MLP, per token) and the attention scores and mixing (2·T·D per token per layer), and the head."""
    h, w, c = spec.input_shape
    p, d = cfg.patch_size, cfg.d_model
    n = (h // p) * (w // p)
    t = n + (cfg.pool == "cls")
    dff = ffn_width(block_config(cfg))
    macs = n * p * p * c * d + cfg.n_layer * t * (4 * d * d + 2 * d * dff + 2 * t * d) + d * spec.num_classes
    return float(3 * 2 * macs)


def image_side(data_cfg) -> int:
    """The image side the data config fixes (digits: 8; images/hf: data.image_size), 0 when only the files know."""
    return 8 if data_cfg.name == "digits" else getattr(data_cfg, "image_size", 0)


def check_config(cfg: ViTConfig, data_cfg, platform: str) -> None:
    one_of("model.pool", cfg.pool, POOLS)
    one_of("model.remat", cfg.remat, REMAT)
    one_of("model.attention", cfg.attention, ATTENTION)
    check(cfg.n_layer > 0 and cfg.n_head > 0 and cfg.patch_size > 0, "model.n_layer/n_head/patch_size",
          (cfg.n_layer, cfg.n_head, cfg.patch_size), "must be > 0")
    check(cfg.d_model > 0 and cfg.d_model % cfg.n_head == 0, "model.d_model", cfg.d_model,
          f"must be > 0 and divisible by model.n_head={cfg.n_head}")
    check(cfg.d_ff >= 0, "model.d_ff", cfg.d_ff, "must be >= 0 (0 = 4 x d_model)")
    check(cfg.attention != "cudnn" or platform == "gpu", "model.attention", cfg.attention,
          f"needs an NVIDIA GPU, but the devices are {platform}; use model.attention=auto or xla")
    check(len(getattr(data_cfg, "input_shape", [0, 0, 0])) == 3, "model", "vit", "needs image inputs (H, W, C)")
    side, p = image_side(data_cfg), cfg.patch_size
    if side and side % p:
        key = "data.image_size" if data_cfg.name != "digits" else "model.patch_size"
        fix = (f"make data.image_size a multiple of model.patch_size={p} (e.g. {max(p, side // p * p)})"
               if data_cfg.name != "digits" else "use a patch size that divides 8 (1, 2, 4 or 8)")
        check(False, key, side if data_cfg.name != "digits" else p,
              f"the {side}x{side} images do not split into {p}x{p} patches; {fix}")


def fits(cfg: ViTConfig, spec: DataSpec) -> str | None:
    if len(spec.input_shape) != 3:
        return (f"model=vit needs image records (H, W, C), but each record has shape {spec.input_shape}; reshape "
                f"the inputs to (N, H, W, C) or use model=mlp")
    h, w, p = spec.input_shape[0], spec.input_shape[1], cfg.patch_size
    if h % p or w % p:
        return (f"the images are {h}x{w}, not divisible by model.patch_size={p}; set data.image_size to a multiple "
                f"of {p} (e.g. {max(p, h // p * p)}) or change model.patch_size")
    return None


register(Family(name="vit", config=ViTConfig, build=lambda cfg, spec, rngs: ViT(cfg, spec, rngs=rngs),
                task="classify", flops_per_example=flops_per_example, check=check_config, fits=fits,
                tensor_widths=lambda cfg: {"model.n_head": [cfg.n_head],
                                           "model.d_ff": [ffn_width(block_config(cfg))]}))
