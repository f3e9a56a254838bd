"""A hand-written GPT training step in plain JAX (no Flax, no mlsys): the baseline that says what a researcher
writing it themselves would get. Same model and optimizer as mlsys's GPT preset: learned positions, pre-norm blocks,
causal attention, exact GELU, tied embeddings, AdamW with weight decay on matrices, global-norm clipping."""

import jax
import jax.numpy as jnp
import optax

from benchmarks.sizes import Size


def init(size: Size, key):
    d, L = size.d_model, size.n_layer
    keys = iter(jax.random.split(key, 4 + 4 * L))
    normal = lambda shape, std=0.02: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
    zeros = lambda n: jnp.zeros((n,), jnp.float32) if size.bias else None  # noqa: E731
    p = {"wte": normal((size.vocab, d)), "wpe": normal((size.seq_len, d)),
         "ln_f": {"scale": jnp.ones((d,)), "bias": zeros(d)}, "blocks": []}
    for _ in range(L):
        p["blocks"].append({
            "ln_1": {"scale": jnp.ones((d,)), "bias": zeros(d)}, "ln_2": {"scale": jnp.ones((d,)), "bias": zeros(d)},
            "qkv": {"w": normal((d, 3 * d)), "b": zeros(3 * d)},
            "proj": {"w": normal((d, d), 0.02 / (2 * L) ** 0.5), "b": zeros(d)},
            "fc": {"w": normal((d, 4 * d)), "b": zeros(4 * d)},
            "fc2": {"w": normal((4 * d, d), 0.02 / (2 * L) ** 0.5), "b": zeros(d)},
        })
    return p


def layer_norm(x, p, eps=1e-5):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"]
    return (y + p["bias"] if p["bias"] is not None else y).astype(x.dtype)


def dense(x, p):
    y = x @ p["w"].astype(x.dtype)
    return y + p["b"].astype(x.dtype) if p["b"] is not None else y


def forward(params, tokens, size: Size, attention=None):
    dt = jnp.bfloat16 if size.bf16 else jnp.float32
    b, t = tokens.shape
    h, dh = size.n_head, size.d_model // size.n_head
    x = (params["wte"][tokens] + params["wpe"][:t]).astype(dt)
    for blk in params["blocks"]:
        qkv = dense(layer_norm(x, blk["ln_1"]), blk["qkv"]).reshape(b, t, 3, h, dh)
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
                                         implementation=attention)
        x = x + dense(y.reshape(b, t, size.d_model), blk["proj"])
        x = x + dense(jax.nn.gelu(dense(layer_norm(x, blk["ln_2"]), blk["fc"]), approximate=False), blk["fc2"])
    x = layer_norm(x, params["ln_f"])
    return (x @ params["wte"].astype(dt).T).astype(jnp.float32)


def make_step(size: Size, params, attention=None):
    mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.99, weight_decay=0.1, mask=mask))

    def loss_fn(params, x, y):
        logits = forward(params, x, size, attention)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx.init(params)
