"""Weight-only quantization of frozen kernels (QLoRA's base weights): int8 with one scale per output channel, and
4-bit NormalFloat (NF4, Dettmers et al. 2023, "QLoRA") with one absmax scale per block of input rows. Kernels are
(in, out) as nnx.Linear keeps them; quantized arrays keep that layout (NF4 packs two codes per byte along the input
axis), so they shard exactly like the kernel they replace. `dequantize` runs inside the jitted matmul: XLA fuses it
into the product's operand, the float kernel is never stored."""

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "nf4")
NF4_BLOCK = 64  # input rows per NF4 scale (the paper's block size)

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, appendix E).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)


def nf4_block(n_in: int) -> int:
    """Rows per scale: NF4_BLOCK when it divides the input size, else the whole column (one scale per output)."""
    return NF4_BLOCK if n_in % NF4_BLOCK == 0 else n_in


def quantize(kernel, mode: str) -> tuple:
    """(codes, scales) of a float (in, out) kernel: int8 codes (in, out) and float32 scales (out,), or NF4 codes
    packed two per uint8 (in/2, out) and float32 scales (in/block, out). Traceable (runs under jit). A kernel of a
    scanned layer stack (L, in, out) is quantized layer by layer (leading axes kept)."""
    w = jnp.asarray(kernel, jnp.float32)
    if w.ndim > 2:
        return jax.vmap(lambda k: quantize(k, mode))(w)
    if mode == "int8":
        scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        safe = jnp.where(scale > 0, scale, 1.0)
        return jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8), scale
    n_in, n_out = w.shape
    block = nf4_block(n_in)
    blocks = w.reshape(n_in // block, block, n_out)
    scale = jnp.max(jnp.abs(blocks), axis=1)  # (in/block, out)
    normed = blocks / jnp.where(scale > 0, scale, 1.0)[:, None, :]
    codes = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4)), axis=-1).astype(jnp.uint8).reshape(n_in, n_out)
    return (codes[0::2] | (codes[1::2] << 4)).astype(jnp.uint8), scale


def dequantize(codes, scale, mode: str, dtype=jnp.float32):
    """The float (in, out) kernel that `quantize` encoded, in `dtype` (layer by layer for stacked codes)."""
    if codes.ndim > 2:
        return jax.vmap(lambda c, s: dequantize(c, s, mode, dtype))(codes, scale)
    if mode == "int8":
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    low, high = codes & 0xF, codes >> 4
    idx = jnp.stack([low, high], axis=1).reshape(2 * codes.shape[0], codes.shape[1])  # rows 0,1,2,... again
    values = jnp.asarray(NF4)[idx.astype(jnp.int32)]
    n_in, n_out = values.shape
    block = n_in // scale.shape[0]
    return (values.reshape(n_in // block, block, n_out) * scale[:, None, :]).reshape(n_in, n_out).astype(dtype)


def check_shape(shape, mode: str, where: str) -> str | None:
    """Why a kernel of `shape` cannot be stored in `mode` (None when it can)."""
    if mode == "nf4" and shape[-2] % 2:
        return f"{where}: NF4 packs two input rows per byte, but the kernel has {shape[-2]} (odd) input rows"
    return None
