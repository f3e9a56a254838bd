"""Sampling from a trained language model: temperature and top-k, the whole generation under one jit."""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from mlsys.tokenizer import from_vocab


@partial(jax.jit, static_argnames=("graphdef", "length", "block_size", "top_k"))
def generate(graphdef, params, rest, prompt: jax.Array, key: jax.Array, *, length: int, block_size: int,
             temperature: float | jax.Array = 1.0, top_k: int = 0) -> jax.Array:
    """Continue the 1-D token array `prompt` by `length` tokens; returns prompt + continuation."""
    model = nnx.merge(graphdef, params, rest)
    n0 = prompt.shape[0]
    buf = jnp.zeros(n0 + length, jnp.int32).at[:n0].set(prompt)

    def body(i, carry):
        buf, key = carry
        # The model sees the last block_size tokens; causal attention makes later (zero) positions irrelevant.
        start = jnp.maximum(0, i - block_size)
        window = jax.lax.dynamic_slice(buf, (start,), (min(block_size, n0 + length),))
        logits = model(window[None])[0, i - 1 - start] / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        key, sub = jax.random.split(key)
        return buf.at[i].set(jax.random.categorical(sub, logits).astype(jnp.int32)), key

    buf, _ = jax.lax.fori_loop(n0, n0 + length, body, (buf, key))
    return buf


def decode(tokens, vocab: dict) -> str:
    """Text of token ids, for a char/byte vocabulary (vocab.json); mlsys.tokenizer holds the logic."""
    return from_vocab(vocab).decode(tokens)


def encode(text: str, vocab: dict) -> list[int]:
    """Token ids of text, for a char/byte vocabulary (characters outside it are dropped)."""
    return from_vocab(vocab).encode(text).tolist()
