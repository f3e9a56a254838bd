"""A decoder-only transformer in the GPT-2 mould: token (+ learned or rotary position) embeddings, pre-norm
blocks of causal self-attention and an MLP, a final norm, and a (possibly tied) language-model head."""

from dataclasses import dataclass
from math import sqrt

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mlsys.errors import check, one_of
from mlsys.models.common import dense_init, dtype_of
from mlsys.models.family import Family, register
from mlsys.parallel import constrain
from mlsys.spec import DataSpec

POS_EMBS = ("learned", "rope")
ATTENTION = {"auto": None, "xla": "xla", "cudnn": "cudnn"}  # jax.nn.dot_product_attention implementations
# Rematerialisation per block: what the backward pass may keep from the forward instead of recomputing.
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclass
class GPTConfig:
    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0  # 0 = 4 * d_model
    block_size: int = 256  # the longest sequence the model accepts
    vocab_size: int = 0  # 0 = the data's vocabulary size
    pos_emb: str = "learned"  # one of POS_EMBS
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype (bfloat16 for mixed precision); norms, softmax, logits, loss in float32
    param_dtype: str = "float32"
    attention: str = "auto"  # one of ATTENTION; cudnn needs an NVIDIA GPU
    remat: str = "none"  # one of REMAT, applied to every block
    vocab_multiple: int = 1  # pad the vocabulary to a multiple of this (128 suits matrix units); padding never wins


def first(table: Array, n, axis: int = 0) -> Array:
    """The first n entries of `table` along `axis`, as one static slice even when n is a symbolic dimension (ONNX
    export): plain indexing table[:n] may lower to a gather, which jax2onnx cannot size symbolically."""
    return jax.lax.slice_in_dim(table, 0, n, axis=axis)


def rope(x: Float[Array, "B T H D"], base: float, max_len: int,
         positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T H D"]:
    """Rotary position embedding (rotate-half form) applied to queries or keys; `positions` (packed documents:
    each restarts at 0) default to 0..T-1."""
    t, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if positions is not None:
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # B, T, D/2
        cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    else:
        # The table is built for max_len positions and sliced: T may be symbolic (ONNX export), arange(T) could not.
        angles = (jnp.arange(max_len, dtype=jnp.float32)[:, None] * inv_freq[None, :])[:t]  # T, D/2
        cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def segment_mask(segment_ids: Int[Array, "B T"]) -> Array:
    """Causal attention restricted to one packed document: query i sees key j iff j <= i and both carry the same
    segment id (padding, id 0, sees only padding; its outputs are masked out of the loss). Shape B 1 T T."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & jnp.tril(jnp.ones((t, t), bool))[None])[:, None]


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, dt, pdt = cfg.d_model, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.n_head, self.pos_emb, self.rope_base = cfg.n_head, cfg.pos_emb, cfg.rope_base
        self.implementation = ATTENTION[cfg.attention]
        self.max_len = cfg.block_size
        self.explicit_mask = False  # True (set by nnx.view at export): a sliced mask table, for a symbolic T
        self.qkv = nnx.Linear(d, 3 * d, use_bias=cfg.bias, dtype=dt, param_dtype=pdt, rngs=rngs,
                              kernel_init=dense_init(("embed", "heads"), 0.02))
        # GPT-2: residual projections start smaller, by 1/sqrt(2 * n_layer).
        self.proj = nnx.Linear(d, d, use_bias=cfg.bias, dtype=dt, param_dtype=pdt, rngs=rngs,
                               kernel_init=dense_init(("heads", "embed"), 0.02 / sqrt(2 * cfg.n_layer)))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def set_view(self, explicit_mask: bool | None = None):
        """For nnx.view(model, explicit_mask=True)."""
        if explicit_mask is not None:
            self.explicit_mask = explicit_mask

    def __call__(self, x: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.n_head, d // self.n_head)
        qkv = constrain(qkv, ("batch", "seq", None, "heads", None))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.pos_emb == "rope":
            q, k = (rope(q, self.rope_base, self.max_len, positions),
                    rope(k, self.rope_base, self.max_len, positions))
        # B T H Dh; the attention logits and their softmax are computed in float32 whatever the compute dtype.
        if segment_ids is not None:  # packed documents: attention never crosses a document boundary
            y = jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids))
        elif self.explicit_mask:  # ONNX export: is_causal needs a static T, a mask table sliced to T does not
            mask = first(first(jnp.tril(jnp.ones((self.max_len, self.max_len), bool)), t), t, axis=1)[None, None]
            y = jax.nn.dot_product_attention(q, k, v, mask=mask)
        else:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.implementation)
        return self.dropout(self.proj(y.reshape(b, t, d)))


class MLPBlock(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d, dff, dt, pdt = cfg.d_model, cfg.d_ff or 4 * cfg.d_model, dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.fc = nnx.Linear(d, dff, use_bias=cfg.bias, dtype=dt, param_dtype=pdt, rngs=rngs,
                             kernel_init=dense_init(("embed", "mlp"), 0.02))
        self.proj = nnx.Linear(dff, d, use_bias=cfg.bias, dtype=dt, param_dtype=pdt, rngs=rngs,
                               kernel_init=dense_init(("mlp", "embed"), 0.02 / sqrt(2 * cfg.n_layer)))
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        h = constrain(jax.nn.gelu(self.fc(x), approximate=False), ("batch", "seq", "mlp"))  # exact GELU, as GPT-2
        return self.dropout(self.proj(h))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.ln_1 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=dt, param_dtype=pdt,
                                  rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=dt, param_dtype=pdt,
                                  rngs=rngs)
        self.mlp = MLPBlock(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"], segment_ids: Int[Array, "B T"] | None = None,
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T D"]:
        x = x + self.attn(self.ln_1(x), segment_ids, positions)
        return constrain(x + self.mlp(self.ln_2(x)), ("batch", "seq", "embed"))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, spec: DataSpec, *, rngs: nnx.Rngs):
        self.vocab = cfg.vocab_size or spec.num_classes  # the real vocabulary
        vocab = -(-self.vocab // cfg.vocab_multiple) * cfg.vocab_multiple  # padded
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.block_size, self.dtype = cfg.block_size, dt
        self.remat_policy = REMAT[cfg.remat] if cfg.remat != "none" else None
        self.remat = cfg.remat != "none"
        emb_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.wte = nnx.Embed(vocab, cfg.d_model, dtype=dt, param_dtype=pdt, embedding_init=emb_init, rngs=rngs)
        pos_init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        self.wpe = nnx.data(nnx.Embed(cfg.block_size, cfg.d_model, dtype=dt, param_dtype=pdt,
                                      embedding_init=pos_init, rngs=rngs) if cfg.pos_emb == "learned" else None)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.blocks = nnx.List(Block(cfg, rngs=rngs) for _ in range(cfg.n_layer))
        self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, use_bias=cfg.bias, dtype=dt, param_dtype=pdt,
                                  rngs=rngs)
        self.lm_head = nnx.data(None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, vocab, use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs,
            kernel_init=dense_init(("embed", "vocab"), 0.02)))

    def __call__(self, tokens: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None = None,
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T V"]:
        """Logits for every position. With packed documents (data.packing=segments) `segment_ids` restrict
        attention to each document and `positions` restart at 0 in each; both None: one causal sequence."""
        x = self.wte(tokens)
        if self.wpe is not None and positions is not None:
            x = x + self.wpe(positions)
        elif self.wpe is not None:
            x = x + first(self.wpe.embedding[...], tokens.shape[1]).astype(x.dtype)[None]  # T may be symbolic
        x = constrain(self.dropout(x), ("batch", "seq", "embed"))
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(_run_block, policy=self.remat_policy)(block, x, segment_ids, positions)
            else:
                x = block(x, segment_ids, positions)
        x = self.ln_f(x)
        logits = (self.wte.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)
        if logits.shape[-1] > self.vocab:  # padded entries are never predicted
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab, logits, -1e30)
        return constrain(logits, ("batch", "seq", "vocab"))


def _run_block(block: Block, x, segment_ids=None, positions=None):
    return block(x, segment_ids, positions)


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token by nanoGPT's (PaLM's) estimate: 6N for the matmuls of forward and backward,
    N without the position embeddings, plus 12·L·H·Q·T for attention (Q the head size, T the sequence length)."""
    n = n_params - (cfg.block_size * cfg.d_model if cfg.pos_emb == "learned" else 0)
    return float(6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.d_model // cfg.n_head) * seq_len)


def check_config(m: GPTConfig, d, platform: str) -> None:
    one_of("model.pos_emb", m.pos_emb, POS_EMBS)
    check(m.n_layer > 0 and m.n_head > 0, "model.n_layer/n_head", (m.n_layer, m.n_head), "must be > 0")
    check(m.d_model % m.n_head == 0, "model.d_model", m.d_model, f"must be divisible by model.n_head={m.n_head}")
    check(m.pos_emb != "rope" or (m.d_model // m.n_head) % 2 == 0, "model.pos_emb", m.pos_emb,
          f"rope needs an even head size, d_model/n_head = {m.d_model // m.n_head}")
    check(getattr(d, "seq_len", 0) <= m.block_size, "data.seq_len", getattr(d, "seq_len", 0),
          f"is above the model's maximum model.block_size={m.block_size}; lower data.seq_len or raise "
          f"model.block_size")
    check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "must be >= 0 (0 = the data's vocabulary)")
    one_of("model.attention", m.attention, ATTENTION)
    one_of("model.remat", m.remat, REMAT)
    check(m.vocab_multiple > 0, "model.vocab_multiple", m.vocab_multiple, "must be > 0 (1 = no padding)")
    check(m.d_model > 0 and m.d_ff >= 0, "model.d_model/d_ff", (m.d_model, m.d_ff),
          "need d_model > 0 and d_ff >= 0 (0 = 4 x d_model)")
    check(m.attention != "cudnn" or platform == "gpu", "model.attention", m.attention,
          f"needs an NVIDIA GPU, but the devices are {platform}; use model.attention=auto or xla")


def flops_per_example(cfg: GPTConfig, spec: DataSpec, n_params: int) -> float:
    seq_len = spec.input_shape[0]
    return seq_len * flops_per_token(cfg, n_params, seq_len)


register(Family(name="gpt", config=GPTConfig, build=lambda cfg, spec, rngs: GPT(cfg, spec, rngs=rngs),
                task="lm", flops_per_example=flops_per_example, check=check_config, max_len=lambda cfg: cfg.block_size,
                tensor_widths=lambda cfg: {"model.n_head": [cfg.n_head], "model.d_ff": [cfg.d_ff or 4 * cfg.d_model]},
                mirrors={"torch": "mlsys.export.torch_mirror:GPT_MIRROR"}))
