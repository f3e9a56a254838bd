"""Transformer layers shared by the decoder families (gpt, llama) and any model that wants them: grouped-query
attention with causal, segment or cache masks, rotary embeddings (with optional Llama-3 frequency scaling), GELU
and SwiGLU MLPs, LayerNorm and RMSNorm, and the pre-norm block. Every kernel carries the logical axis names the
mesh rules map (embed, heads, mlp, vocab), so every mesh, FSDP and tensor parallelism work for any of them."""

from dataclasses import dataclass
from math import pi, sqrt
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mlsys.models import attention, dense
from mlsys.models.common import dense_init, dtype_of
from mlsys.parallel import constrain

POS_EMBS = ("learned", "rope")
NORMS = ("layer", "rms")
MLPS = ("gelu", "swiglu")
# jax.nn.dot_product_attention implementations. "auto" is JAX's choice, except for the plain causal attention of
# training on a CPU backend: mlsys.models.attention there (the same values, a cheaper backward pass).
ATTENTION = {"auto": None, "xla": "xla", "cudnn": "cudnn"}
# Rematerialisation per block: what the backward pass may keep from the forward instead of recomputing.
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclass
class TransformerConfig:
    """A decoder-only transformer. The families (model=gpt, model=llama) differ only in their defaults."""

    name: str = "???"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # key/value heads; 0 = n_head (multi-head), fewer = grouped-query attention
    d_model: int = 128
    d_ff: int = 0  # 0 = 4 x d_model (gelu) or 8/3 x d_model rounded up to a multiple of 32 (swiglu)
    block_size: int = 256  # the longest sequence the model accepts (and the KV cache's length)
    vocab_size: int = 0  # 0 = the data's vocabulary size
    pos_emb: str = "learned"  # one of POS_EMBS
    rope_base: float = 10000.0
    rope_scaling: float = 0.0  # Llama-3 frequency scaling factor (e.g. 8.0); 0 = off
    rope_low_freq_factor: float = 1.0  # Llama-3 scaling: wavelengths above original_max_len / this are scaled
    rope_high_freq_factor: float = 4.0  # ... below original_max_len / this are kept; smooth in between
    rope_original_max_len: int = 8192  # the context length the unscaled frequencies were trained for
    norm: str = "layer"  # one of NORMS
    mlp: str = "gelu"  # one of MLPS
    tie_embeddings: bool = True
    bias: bool = True
    qkv_bias: bool = False  # biases on the query/key/value projection even with bias=False (Qwen2)
    gelu_approximate: bool = False  # mlp=gelu: the tanh approximation (GPT-2's "gelu_new") instead of exact GELU
    dropout: float = 0.0
    norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype (bfloat16 for mixed precision); norms, softmax, logits, loss in float32
    param_dtype: str = "float32"
    attention: str = "auto"  # one of ATTENTION; cudnn needs an NVIDIA GPU
    remat: str = "none"  # one of REMAT, applied to every block
    scan_layers: bool = True  # blocks stacked and run under lax.scan: compile time independent of depth
    # The stacked blocks run as a Python loop over the layer axis instead of lax.scan (same parameters and
    # checkpoints): no scan carry buffers, a faster step for shallow models on CPU; compile time grows with depth.
    unroll_layers: bool = False
    vocab_multiple: int = 1  # pad the vocabulary to a multiple of this (128 suits matrix units); padding never wins


def kv_heads(cfg: TransformerConfig) -> int:
    return cfg.n_kv_head or cfg.n_head


def ffn_width(cfg: TransformerConfig) -> int:
    if cfg.d_ff:
        return cfg.d_ff
    return 4 * cfg.d_model if cfg.mlp == "gelu" else -(-8 * cfg.d_model // 3 // 32) * 32


def first(table: Array, n, axis: int = 0) -> Array:
    """The first n entries of `table` along `axis`, as one static slice even when n is a symbolic dimension (ONNX
    export): plain indexing table[:n] may lower to a gather, which jax2onnx cannot size symbolically."""
    return jax.lax.slice_in_dim(table, 0, n, axis=axis)


class RopeSpec(NamedTuple):
    """The rotary embedding's settings (hashable: kept on the module as a static attribute)."""

    head_dim: int
    base: float
    scaling: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_len: int

    @classmethod
    def of(cls, cfg: TransformerConfig) -> "RopeSpec":
        return cls(cfg.d_model // cfg.n_head, cfg.rope_base, cfg.rope_scaling, cfg.rope_low_freq_factor,
                   cfg.rope_high_freq_factor, cfg.rope_original_max_len)


def rope_frequencies(r: RopeSpec) -> Array:
    """Inverse frequencies of the rotary embedding; with scaling > 0, Llama 3's rescaling: long wavelengths
    slowed by the factor, short ones kept, a smooth blend in between."""
    inv = 1.0 / (r.base ** (jnp.arange(0, r.head_dim, 2, dtype=jnp.float32) / r.head_dim))
    if not r.scaling:
        return inv
    f, lo, hi, old = r.scaling, r.low_freq_factor, r.high_freq_factor, r.original_max_len
    wavelen = 2 * pi / inv
    scaled = jnp.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return jnp.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)


def rope_table(inv_freq: Array, t, max_len: int, positions: Int[Array, "B T"] | None = None):
    """(cos, sin) for positions 0..T-1 (a table for max_len positions, sliced: T may be symbolic at export) or for
    the given per-row `positions` (packed documents, KV-cache decoding). Shapes broadcast to B T H D/2."""
    if positions is None:
        # A plain [:t], not first(): jax2onnx sizes this slice of a computed table right, a lax.slice_in_dim of it
        # becomes an ONNX Expand of the wrong shape (seen with jax2onnx 0.17.1).
        angles = (jnp.arange(max_len, dtype=jnp.float32)[:, None] * inv_freq[None, :])[:t][None]  # 1 T D/2
    else:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # B T D/2
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: Float[Array, "B T H D"], cos, sin) -> Float[Array, "B T H D"]:
    """Rotary position embedding (rotate-half form) applied to queries or keys."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def segment_mask(segment_ids: Int[Array, "B T"]) -> Array:
    """Causal attention within one packed document: query i sees key j iff j <= i and both carry the same segment
    id (padding, id 0, sees only padding; the loss masks it out). Shape B 1 T T."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & jnp.tril(jnp.ones((t, t), bool))[None])[:, None]


def position_mask(positions: Int[Array, "B T"], key_positions: Int[Array, "#B S"], valid=None) -> Array:
    """Cached attention: the query at position p sees every key slot holding a position <= p (and, with `valid`
    B S, only the valid slots). Shape B 1 T S."""
    seen = key_positions[:, None, :] <= positions[:, :, None]
    return (seen if valid is None else seen & valid[:, None, :])[:, None]


def cache_mask(positions: Int[Array, "B T"], length: int) -> Array:
    """Fixed-size KV cache: slot j holds position j, so a query at position p sees slots j <= p (later slots are
    empty or stale). Shape B 1 T S."""
    return position_mask(positions, jnp.arange(length)[None])


def past_mask(attention_mask: Int[Array, "B S"], positions: Int[Array, "B T"]) -> Array:
    """Concatenated past (ONNX decoder): slots are the real tokens of each row with padding anywhere between
    (attention_mask 0); a real slot holds the count of real slots before it, so left-padded, ragged rows share a
    batch. Shape B 1 T S, S = past + new."""
    valid = attention_mask > 0
    return position_mask(positions, jnp.cumsum(attention_mask, axis=1) - 1, valid)


class Past(NamedTuple):
    """A growing KV cache (ONNX decoder form): each step's keys and values are appended, B S K Dh each (L B S K Dh
    for a stack), instead of written into fixed slots."""

    key: Array
    value: Array


def linear(cfg: TransformerConfig, d_in: int, d_out: int, names: tuple, std: float, rngs: nnx.Rngs,
           bias: bool | None = None) -> nnx.Linear:
    # dense.dot_general: the weight gradient as one 2-D matmul over the tokens (XLA:CPU's fast path; same values).
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias if bias is None else bias, dtype=dtype_of(cfg.dtype),
                      param_dtype=dtype_of(cfg.param_dtype), kernel_init=dense_init(names, std), rngs=rngs,
                      dot_general=dense.dot_general)


def make_norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    if cfg.norm == "rms":
        return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=dt, param_dtype=pdt, rngs=rngs)


class Attention(nnx.Module):
    """Causal self-attention with n_kv_head key/value heads shared by groups of query heads (n_kv_head = n_head:
    multi-head). One fused input projection (queries, keys, values side by side), one output projection."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, h, kv = cfg.d_model, cfg.n_head, kv_heads(cfg)
        self.n_head, self.n_kv_head, self.head_dim = h, kv, d // h
        self.implementation = ATTENTION[cfg.attention]
        self.qkv = linear(cfg, d, (h + 2 * kv) * self.head_dim, ("embed", "heads"), 0.02, rngs,
                          bias=cfg.bias or cfg.qkv_bias)
        # GPT-2: residual projections start smaller, by 1/sqrt(2 * n_layer).
        self.proj = linear(cfg, h * self.head_dim, d, ("heads", "embed"), 0.02 / sqrt(2 * cfg.n_layer), rngs)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"], rope, mask, cache=None, positions=None):
        """rope: (cos, sin) or None; mask: B 1 T S booleans, or None for plain causal attention; cache: (keys,
        values) of shape B S K Dh, written at `positions` (B T) and attended to whole, or a Past that this step's
        keys and values are appended to (S grows by T). Returns (y, cache)."""
        b, t, _ = x.shape
        h, kv, hd = self.n_head, self.n_kv_head, self.head_dim
        y = self.qkv(x)
        if kv == h:
            qkv = constrain(y.reshape(b, t, 3, h, hd), ("batch", "seq", None, "heads", None))
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q, k, v = jnp.split(y, [h * hd, (h + kv) * hd], axis=-1)
            q = constrain(q.reshape(b, t, h, hd), ("batch", "seq", "heads", None))
            k = constrain(k.reshape(b, t, kv, hd), ("batch", "seq", "heads", None))
            v = constrain(v.reshape(b, t, kv, hd), ("batch", "seq", "heads", None))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(cache, Past):  # append this step's keys and values, then attend to all of them
            cache = Past(jnp.concatenate([cache.key, k.astype(cache.key.dtype)], axis=1),
                         jnp.concatenate([cache.value, v.astype(cache.value.dtype)], axis=1))
            k, v = cache
        elif cache is not None:  # write this step's keys and values at their positions, then attend to the cache
            rows = jnp.arange(b)[:, None]
            cache = (cache[0].at[rows, positions].set(k.astype(cache[0].dtype)),
                     cache[1].at[rows, positions].set(v.astype(cache[1].dtype)))
            k, v = cache
        if kv != h:  # each group of h/kv query heads reads one key/value head (stacked copies, not jnp.repeat:
            # its broadcast lowers to an ONNX Expand that a symbolic length breaks)
            k, v = (jnp.stack([a] * (h // kv), axis=3).reshape(b, a.shape[1], h, hd) for a in (k, v))
        # B T H Dh; the attention logits and their softmax are computed in float32 whatever the compute dtype.
        if mask is None and self.implementation is None and jax.default_backend() == "cpu":
            y = attention.causal(q, k, v)
        elif mask is None:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        else:
            y = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask)
        return self.dropout(self.proj(y.reshape(b, t, h * hd))), cache


class MLP(nnx.Module):
    """GELU (GPT-2: fc → GELU → proj) or SwiGLU (Llama: proj(silu(gate(x)) · fc(x)))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, dff = cfg.d_model, ffn_width(cfg)
        self.fc = linear(cfg, d, dff, ("embed", "mlp"), 0.02, rngs)
        self.proj = linear(cfg, dff, d, ("mlp", "embed"), 0.02 / sqrt(2 * cfg.n_layer), rngs)
        self.gate = nnx.data(linear(cfg, d, dff, ("embed", "mlp"), 0.02, rngs) if cfg.mlp == "swiglu" else None)
        self.gelu_approximate = cfg.gelu_approximate
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        h = self.fc(x)
        if self.gate is None:  # exact GELU (erf form: fast on XLA:CPU) unless trained with the tanh form (GPT-2)
            h = jax.nn.gelu(h, approximate=True) if self.gelu_approximate else dense.gelu(h)
        else:
            h = jax.nn.silu(self.gate(x)) * h
        return self.dropout(self.proj(constrain(h, ("batch", "seq", "mlp"))))


class Block(nnx.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.ln_1 = make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = make_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"], rope=None, mask=None, cache=None, positions=None):
        a, cache = self.attn(self.ln_1(x), rope, mask, cache, positions)
        x = x + a
        return constrain(x + self.mlp(self.ln_2(x)), ("batch", "seq", "embed")), cache


def flops_per_token(cfg: TransformerConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token by nanoGPT's (PaLM's) estimate: 6N for the matmuls of forward and backward,
    N without the position embeddings, plus 12·L·H·Q·T for attention (Q the head size, T the sequence length)."""
    n = n_params - (cfg.block_size * cfg.d_model if cfg.pos_emb == "learned" else 0)
    return float(6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.d_model // cfg.n_head) * seq_len)
