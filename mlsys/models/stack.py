"""A stack of identical blocks, unrolled (an nnx.List: blocks.0, blocks.1, ...) or scanned (one block whose every
variable carries a leading layer axis, run under lax.scan, so that compile time does not grow with depth).

The scanned stack is built from the same per-layer blocks as the unrolled one and then stacked, so both layouts
start from identical weights for a given seed. The layer axis is unnamed (replicated) in the sharding metadata;
the other axes keep their logical names, so every mesh shards a stacked kernel exactly as it shards one layer's."""

import jax
import jax.numpy as jnp
from flax import nnx


def stack_modules(modules: list) -> nnx.Module:
    """One module of the same structure whose variables hold the modules' variables stacked on a new first axis."""
    graphdef, _ = nnx.split(modules[0])
    flats = [nnx.to_flat_state(nnx.state(m)) for m in modules]
    out = []
    for items in zip(*flats):
        path, v0 = items[0]
        meta = v0.get_metadata()
        if meta.get("out_sharding"):
            meta["out_sharding"] = (None, *meta["out_sharding"])
        out.append((path, type(v0)(jnp.stack([v.get_value() for _, v in items]), **meta)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def layer_count(blocks) -> int:
    if isinstance(blocks, nnx.List):
        return len(blocks)
    return jax.tree.leaves(nnx.state(blocks, nnx.Param))[0].shape[0]


def _run(block, x, *args):
    return block(x, *args)


def run_blocks(blocks, x, args: tuple, cache=None, remat_policy=None, remat: bool = False, unroll: bool = False,
               draws_rngs: bool = True):
    """x through every block; args (rope, mask, positions) are shared by all layers; cache: (keys, values), each
    L B S K Dh (a tuple, or a transformer.Past that grows), or None. Returns (x, cache). unroll=True runs a
    scanned stack as a Python loop over its layers (ONNX export: one graph node per layer instead of a loop). draws_rngs=False (no active dropout): the RNG
    streams did not move and are not written back, so the model may be called inside any trace (export, cond)."""
    rope, mask, positions = args
    if isinstance(blocks, nnx.List):
        new = []
        for i, block in enumerate(blocks):
            layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
            call = nnx.remat(_run, policy=remat_policy) if remat else _run
            x, layer_cache = call(block, x, rope, mask, layer_cache, positions)
            new.append(layer_cache)
        return x, None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new)

    # Scanned: the RNG streams (dropout) advance and come back out; the weights are only read. Without active
    # dropout the streams are not touched at all (no operation on key arrays: jax2onnx cannot take them).
    graphdef, rng_state, weights = nnx.split(blocks, nnx.RngState, ...)

    def body(x, layer):
        rng_l, weights_l, cache_l = layer
        block = nnx.merge(graphdef, rng_l if draws_rngs else rng_state, weights_l)
        x, cache_l = block(x, rope, mask, cache_l, positions)
        return x, (nnx.state(block, nnx.RngState) if draws_rngs else None, cache_l)

    if remat:  # inside the scan: each layer's activations are recomputed in the backward pass by the policy
        body = jax.checkpoint(body, policy=remat_policy)
    xs = (rng_state if draws_rngs else None, weights, cache)
    if unroll:
        outs = []
        for i in range(layer_count(blocks)):
            x, out = body(x, jax.tree.map(lambda a: jax.lax.index_in_dim(a, i, keepdims=False), xs))
            outs.append(out)
        new_rngs, cache = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
        x, (new_rngs, cache) = jax.lax.scan(body, x, xs)
    if draws_rngs:
        nnx.update(blocks, new_rngs)
    return x, cache
