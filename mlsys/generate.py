"""Text generation for the decoder families (gpt, llama) with a KV cache: one prefill of the prompts, then
one-token decode steps, all under one jit. Temperature (0 = greedy), top-k, top-p, stop at EOS, and a batch of
prompts of different lengths (right-padded; each row writes its own cache slots).

The cache holds block_size positions. A continuation that outgrows the block slides: the cache is rebuilt from
the last half block of tokens (one prefill) and decoding goes on. `generate(..., cached=False)` is the reference
the cache is tested against: it recomputes the whole window for every new token (what sampling did before)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlsys.errors import ConfigError


def pick(logits, key, temperature, *, greedy: bool, top_k: int, top_p: float):
    """One token per row from float32 logits (B, V)."""
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:  # the smallest set of tokens whose probabilities add up to top_p (the most likely always in)
        order = jnp.sort(logits, -1)[:, ::-1]
        probs = jax.nn.softmax(order, -1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted token
        cutoff = jnp.min(jnp.where(before < top_p, order, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


STATIC = ("graphdef", "block", "max_new", "greedy", "top_k", "top_p", "eos_id")


@partial(jax.jit, static_argnames=STATIC)
def _cached(graphdef, params, rest, buf, lengths, key, temperature, *, block, max_new, greedy, top_k, top_p,
            eos_id):
    # The model is merged inside each traced function that calls it: NNX refuses state touched across traces.
    def model():
        return nnx.merge(graphdef, params, rest, copy=True)

    b, n_total = buf.shape
    s = block
    refill_len = max(1, s // 2)
    rows = jnp.arange(b)

    def prefill(buf, n, length: int):
        """The last min(n, length) tokens of every row into a fresh cache; logits after each row's last token."""
        w = jnp.minimum(n, length)
        idx = jnp.clip((n - w)[:, None] + jnp.arange(length)[None], 0, n_total - 1)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        m = model()
        logits, cache = m.decode(jnp.take_along_axis(buf, idx, 1), positions, m.init_cache(b))
        return logits[rows, w - 1], cache, w.astype(jnp.int32)

    def body(carry):
        t, buf, n, pos, cache, logits, done, key = carry
        key, sub = jax.random.split(key)
        tok = pick(logits, sub, temperature, greedy=greedy, top_k=top_k, top_p=top_p)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        buf, n = buf.at[rows, n].set(tok), n + 1

        def step(_):
            out, new = model().decode(tok[:, None], pos[:, None], cache)
            return out[:, 0], new, pos + 1

        # A row whose cache is full slides: rebuild every row's cache from its last half block.
        logits, cache, pos = jax.lax.cond(jnp.max(pos) >= s, lambda _: prefill(buf, n, refill_len), step, None)
        return t + 1, buf, n, pos, cache, logits, done, key

    logits, cache, pos = prefill(buf, lengths, buf.shape[1] - max_new)
    carry = (jnp.zeros((), jnp.int32), buf, lengths, pos, cache, logits, jnp.zeros(b, bool), key)
    out = jax.lax.while_loop(lambda c: (c[0] < max_new) & ~jnp.all(c[6]), body, carry)
    return out[1]


@partial(jax.jit, static_argnames=STATIC)
def _uncached(graphdef, params, rest, buf, lengths, key, temperature, *, block, max_new, greedy, top_k, top_p,
              eos_id):
    b, n_total = buf.shape
    window = min(block, n_total)
    rows = jnp.arange(b)

    def body(carry):
        t, buf, n, done, key = carry
        start = jnp.maximum(n - window, 0)  # the model sees the last block_size tokens
        idx = jnp.clip(start[:, None] + jnp.arange(window)[None], 0, n_total - 1)
        logits = nnx.merge(graphdef, params, rest, copy=True)(jnp.take_along_axis(buf, idx, 1))[rows, n - start - 1]
        key, sub = jax.random.split(key)
        tok = pick(logits, sub, temperature, greedy=greedy, top_k=top_k, top_p=top_p)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        return t + 1, buf.at[rows, n].set(tok), n + 1, done, key

    carry = (jnp.zeros((), jnp.int32), buf, lengths, jnp.zeros(b, bool), key)
    return jax.lax.while_loop(lambda c: (c[0] < max_new) & ~jnp.all(c[3]), body, carry)[1]


def generate(model: nnx.Module, prompts: list[list[int]], max_new_tokens: int, *, key: jax.Array | None = None,
             temperature: float | int = 1.0, top_k: int = 0, top_p: float | int = 1.0, eos_id: int | None = None,
             cached: bool = True, block_size: int | None = None) -> list[list[int]]:
    """Continue each token list in `prompts` by up to `max_new_tokens` tokens (fewer where EOS came first; the
    EOS itself is not returned). temperature=0 is greedy decoding. Returns the continuations only. A model without
    a KV cache (a custom one) is sampled the uncached way, with windows of `block_size` tokens."""
    block = block_size or model.block_size
    cached = cached and hasattr(model, "decode")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i}: empty after tokenization; give text with at least one token the "
                              f"vocabulary knows")
        if len(p) > block:
            raise ConfigError(f"prompt {i}: {len(p)} tokens, longer than the model's block_size={block}; shorten "
                              f"it to at most {block} tokens")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: need temperature >= 0 "
                          f"(0 = greedy), top_k >= 0 (0 = all), 0 < top_p <= 1")
    lengths = np.array([len(p) for p in prompts], np.int32)
    buf = np.zeros((len(prompts), int(lengths.max()) + max_new_tokens), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    graphdef, params, rest = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False), nnx.Param, ...)
    fn = _cached if cached else _uncached
    out = np.asarray(fn(graphdef, params, rest, jnp.asarray(buf), jnp.asarray(lengths),
                        jax.random.key(0) if key is None else key, jnp.float32(max(temperature, 1e-6)),
                        block=block, max_new=max_new_tokens, greedy=temperature == 0,
                        top_k=min(top_k, getattr(model, "vocab", top_k)),
                        top_p=float(top_p), eos_id=eos_id))
    result = []
    for i, n in enumerate(lengths):
        cont = out[i, n: n + max_new_tokens].tolist()
        result.append(cont[: cont.index(eos_id)] if eos_id is not None and eos_id in cont else cont)
    return result


def complete(model: nnx.Module, tokenizer, prompt: str, max_new_tokens: int, *, seed: int = 0,
             temperature: float | int = 1.0, top_k: int = 0, top_p: float | int = 1.0,
             block_size: int | None = None) -> str:
    """The continuation of one text prompt, as text, by the run's tokenizer (mlsys.tokenizer; stops at its EOS)."""
    tokens = tokenizer.encode(prompt).tolist()
    if not tokens:
        raise ConfigError(f"prompt={prompt!r}: empty after tokenization (none of its characters is in the run's "
                          f"vocabulary); give text from the training corpus's alphabet")
    out = generate(model, [tokens], max_new_tokens, key=jax.random.key(seed), temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_id=tokenizer.specials.get("eos"), block_size=block_size)
    return tokenizer.decode(out[0])
