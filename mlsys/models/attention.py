"""Causal self-attention with a hand-written backward pass: the decoder families' training attention on CPU.

Forward values are jax.nn.dot_product_attention's (logits and softmax in float32, the masked logits at the same
large negative number). The backward is FlashAttention's: the softmax gradient needs each query's Σ_k dP·P, which
autodiff takes as a reduction over the (B, H, T, T) probabilities; the same number is Σ_d dO·O, a reduction over
the head dimension of the (B, T, H, D) output. On XLA:CPU that reduction over the key axis was the step's costliest
elementwise work (4 thunks, ~13% of shakespeare_char's step): with it gone the step runs ~12% faster
(benchmarks/RESULTS.md). `model.attention=xla` keeps JAX's own attention.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def _forward(q, k, v, scale: float):
    t = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # JAX's mask value: finite, so a softmax row never sees inf - inf.
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -0.7 * float(jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v), probs


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale: float):
    return _forward(q, k, v, scale)[0]


def _attention_fwd(q, k, v, scale: float):
    out, probs = _forward(q, k, v, scale)
    return out, (q, k, v, probs, out)


def _attention_bwd(scale: float, res, d_out):
    q, k, v, probs, out = res
    d_v = jnp.einsum("bhqk,bqhd->bkhd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bqhd,bkhd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    # Σ_k dP·P = Σ_d dO·O per query: the softmax gradient's row sums without a pass over the probabilities.
    rows = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_logits = (probs * (d_probs - rows[..., None]) * scale).astype(q.dtype)
    return (jnp.einsum("bhqk,bkhd->bqhd", d_logits, k), jnp.einsum("bhqk,bqhd->bkhd", d_logits, q), d_v)


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal(q: Float[Array, "B T H D"], k: Float[Array, "B T H D"],
           v: Float[Array, "B T H D"]) -> Float[Array, "B T H D"]:
    """softmax(q·kᵀ/√D, causal mask)·v, query i attending keys 0..i; queries and keys of the same length."""
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"causal attention needs queries, keys and values of one shape (B, T, H, D); got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    return _attention(q, k, v, float(1.0 / np.sqrt(q.shape[-1])))
