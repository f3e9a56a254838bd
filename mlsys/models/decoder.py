"""A decoder-only language model built from the shared transformer layers: token (+ learned or rotary position)
embeddings, a stack of pre-norm blocks (scanned or unrolled), a final norm and a (possibly tied) head. `gpt` and
`llama` are this module with their own defaults; both decode with a KV cache (mlsys.generate)."""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from mlsys.errors import check, one_of
from mlsys.models.common import dense_init, dtype_of
from mlsys.models.family import Family
from mlsys.models.stack import layer_count, run_blocks, stack_modules
from mlsys.models.transformer import (ATTENTION, MLPS, NORMS, POS_EMBS, REMAT, Block, Past, RopeSpec,
                                      TransformerConfig, cache_mask, ffn_width, first, flops_per_token, kv_heads,
                                      make_norm, past_mask, rope_frequencies, rope_table, segment_mask)
from mlsys.parallel import constrain
from mlsys.spec import DataSpec


class Decoder(nnx.Module):
    def __init__(self, cfg: TransformerConfig, spec: DataSpec, *, rngs: nnx.Rngs):
        # Static attributes only (hashable: the graphdef is a jit static argument), not the config dataclass.
        self.rope = RopeSpec.of(cfg) if cfg.pos_emb == "rope" else None
        self.cache_heads = (kv_heads(cfg), cfg.d_model // cfg.n_head)
        self.vocab = cfg.vocab_size or spec.num_classes  # the real vocabulary
        vocab = -(-self.vocab // cfg.vocab_multiple) * cfg.vocab_multiple  # padded
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.block_size, self.dtype = cfg.block_size, dt
        self.remat_policy = REMAT[cfg.remat] if cfg.remat != "none" else None
        self.remat = cfg.remat != "none"
        self.explicit_mask = False  # True (nnx.view at export): a sliced mask table, for a symbolic T
        # True (model.unroll_layers, or nnx.view at export): a scanned stack runs as a Python loop
        self.unroll_layers = cfg.unroll_layers
        emb_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.wte = nnx.Embed(vocab, cfg.d_model, dtype=dt, param_dtype=pdt, embedding_init=emb_init, rngs=rngs)
        pos_init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
        self.wpe = nnx.data(nnx.Embed(cfg.block_size, cfg.d_model, dtype=dt, param_dtype=pdt,
                                      embedding_init=pos_init, rngs=rngs) if cfg.pos_emb == "learned" else None)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)]
        self.blocks = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.ln_f = make_norm(cfg, rngs)
        self.lm_head = nnx.data(None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, vocab, use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs,
            kernel_init=dense_init(("embed", "vocab"), 0.02)))

    def set_view(self, explicit_mask: bool | None = None, unroll_layers: bool | None = None):
        """For nnx.view(model, explicit_mask=True, unroll_layers=True) (ONNX export)."""
        if explicit_mask is not None:
            self.explicit_mask = explicit_mask
        if unroll_layers is not None:
            self.unroll_layers = unroll_layers

    def __call__(self, tokens: Int[Array, "B T"], segment_ids: Int[Array, "B T"] | None = None,
                 positions: Int[Array, "B T"] | None = None) -> Float[Array, "B T V"]:
        """Logits for every position. With packed documents (data.packing=segments) `segment_ids` restrict
        attention to each document and `positions` restart at 0 in each; both None: one causal sequence."""
        t = tokens.shape[1]
        if segment_ids is not None:  # packed documents: attention never crosses a document boundary
            mask = segment_mask(segment_ids)
        elif self.explicit_mask:  # ONNX export: is_causal needs a static T, a mask table sliced to T does not
            mask = first(first(jnp.tril(jnp.ones((self.block_size, self.block_size), bool)), t), t, axis=1)
            mask = mask[None, None]
        else:
            mask = None
        return self._forward(tokens, positions, mask, None)[0]

    def decode(self, tokens: Int[Array, "B T"], positions: Int[Array, "B T"], cache: tuple):
        """Logits of `tokens` at `positions` (absolute, per row), their keys and values written into the KV
        cache at those slots; each token attends to every slot up to its own position. Returns (logits, cache)."""
        return self._forward(tokens, positions, cache_mask(positions, cache[0].shape[2]), cache)

    def step(self, tokens: Int[Array, "B T"], attention_mask: Int[Array, "B S"], positions: Int[Array, "B T"],
             past: Past) -> tuple:
        """The growing-cache form of `decode` (the ONNX decoder's): `tokens` at `positions` attend to the real
        slots (attention_mask 1) of past + themselves; their keys and values are appended to `past` (L B P K Dh
        each; S = P + T). Rows may be left-padded or ragged. Returns (logits, Past of L B S K Dh)."""
        return self._forward(tokens, positions, past_mask(attention_mask, positions), past)

    def empty_past(self, batch: int) -> Past:
        """A Past holding nothing yet (P = 0) for `batch` rows."""
        shape = (layer_count(self.blocks), batch, 0, *self.cache_heads)
        return Past(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))

    def init_cache(self, batch: int) -> tuple:
        """An empty KV cache for `batch` rows: (keys, values), each n_layer B block_size n_kv_head head_dim."""
        shape = (layer_count(self.blocks), batch, self.block_size, *self.cache_heads)
        return jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)

    def _forward(self, tokens, positions, mask, cache):
        x = self.wte(tokens)
        t = tokens.shape[1]
        if self.wpe is not None and positions is not None:
            x = x + self.wpe(positions)
        elif self.wpe is not None:
            x = x + first(self.wpe.embedding[...], t).astype(x.dtype)[None]  # T may be symbolic
        x = constrain(self.dropout(x), ("batch", "seq", "embed"))
        rope = None
        if self.rope is not None:
            rope = rope_table(rope_frequencies(self.rope), t, self.block_size, positions)
        draws = self.dropout.rate > 0 and not self.dropout.deterministic  # eval views set every Dropout alike
        x, cache = run_blocks(self.blocks, x, (rope, mask, positions), cache, self.remat_policy, self.remat,
                              self.unroll_layers, draws)
        x = self.ln_f(x)
        logits = (self.wte.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)
        if logits.shape[-1] > self.vocab:  # padded entries are never predicted
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab, logits, -1e30)
        return constrain(logits, ("batch", "seq", "vocab")), cache


def check_config(m: TransformerConfig, d, platform: str) -> None:
    """The decoder's config keys, before anything is built (one ConfigError line each)."""
    one_of("model.pos_emb", m.pos_emb, POS_EMBS)
    one_of("model.norm", m.norm, NORMS)
    one_of("model.mlp", m.mlp, MLPS)
    check(m.n_layer > 0 and m.n_head > 0, "model.n_layer/n_head", (m.n_layer, m.n_head), "must be > 0")
    check(m.d_model % m.n_head == 0, "model.d_model", m.d_model, f"must be divisible by model.n_head={m.n_head}")
    check(m.n_kv_head >= 0 and (m.n_kv_head == 0 or m.n_head % m.n_kv_head == 0), "model.n_kv_head", m.n_kv_head,
          f"model.n_head={m.n_head} must be a multiple of it (each key/value head serves a group of query heads); "
          f"use a divisor of {m.n_head}, or 0 (= n_head)")
    check(m.pos_emb != "rope" or (m.d_model // m.n_head) % 2 == 0, "model.pos_emb", m.pos_emb,
          f"rope needs an even head size, d_model/n_head = {m.d_model // m.n_head}")
    check(m.rope_scaling >= 0, "model.rope_scaling", m.rope_scaling, "must be >= 0 (0 = off, e.g. 8.0)")
    check(not m.rope_scaling or (0 < m.rope_low_freq_factor < m.rope_high_freq_factor and m.rope_original_max_len > 0),
          "model.rope_low_freq_factor/rope_high_freq_factor", (m.rope_low_freq_factor, m.rope_high_freq_factor),
          "need 0 < low < high (Llama 3: 1.0, 4.0) and rope_original_max_len > 0")
    check(getattr(d, "seq_len", 0) <= m.block_size, "data.seq_len", getattr(d, "seq_len", 0),
          f"is above the model's maximum model.block_size={m.block_size}; lower data.seq_len or raise "
          f"model.block_size")
    check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "must be >= 0 (0 = the data's vocabulary)")
    one_of("model.attention", m.attention, ATTENTION)
    one_of("model.remat", m.remat, REMAT)
    check(m.vocab_multiple > 0, "model.vocab_multiple", m.vocab_multiple, "must be > 0 (1 = no padding)")
    check(m.d_model > 0 and m.d_ff >= 0, "model.d_model/d_ff", (m.d_model, m.d_ff),
          "need d_model > 0 and d_ff >= 0 (0 = the MLP's default width)")
    check(m.attention != "cudnn" or platform == "gpu", "model.attention", m.attention,
          f"needs an NVIDIA GPU, but the devices are {platform}; use model.attention=auto or xla")


def flops_per_example(cfg: TransformerConfig, spec: DataSpec, n_params: int) -> float:
    seq_len = spec.input_shape[0]
    return seq_len * flops_per_token(cfg, n_params, seq_len)


def decoder_family(name: str, config: type, module: type) -> Family:
    """The Family of a decoder (gpt, llama): same checks, FLOPs, tensor-parallel widths and torch mirror."""
    return Family(name=name, config=config, build=lambda cfg, spec, rngs: module(cfg, spec, rngs=rngs), task="lm",
                  flops_per_example=flops_per_example, check=check_config, max_len=lambda cfg: cfg.block_size,
                  tensor_widths=lambda cfg: {"model.n_head": [cfg.n_head], "model.d_ff": [ffn_width(cfg)]},
                  mirrors={"torch": "mlsys.export.torch_mirror:GPT_MIRROR"})
