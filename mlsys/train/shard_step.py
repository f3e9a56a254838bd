"""The train step written with jax.shard_map and explicit collectives, for users who want to see and control
every byte that moves. `trainer.step=shard_map` selects it; it gives the jit step's numbers (tested).

The data and fsdp mesh axes are manual; the tensor axis stays automatic (GSPMD inside the map). Each device holds
its rows of the batch and its fsdp slice of every parameter and optimizer-state array:
  1. all-gather each fsdp-sharded parameter over `fsdp` → whole parameters (for this step only);
  2. forward and backward on the local rows → the gradient of the local mean loss;
  3. reduce-scatter fsdp-sharded gradients over `fsdp` and sum over `data` (all-reduce the others over both),
     divided by the shard count → each device's slice of the gradient of the global mean loss;
  4. clip by the global norm (squared norms of the slices summed over `fsdp`) and update the local slices.
Batch norm normalises with the statistics of the whole global batch (pmean over the shards), as the jit step;
dropout draws a different mask on every shard.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from mlsys.errors import ConfigError
from mlsys.models.lora import Frozen
from mlsys.parallel import activation_sharding
from mlsys.train.state import TrainState
from mlsys.train.step import bits_per_byte, is_key, loss_and_grads, skip_unless

MANUAL = ("data", "fsdp")


def is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def manual_spec(spec: P) -> P:
    """Keep the manual axes of a PartitionSpec; the tensor axis is left to the compiler."""
    out = []
    for entry in spec:
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(n for n in names if n in MANUAL)
        out.append(kept[0] if len(kept) == 1 else (kept or None))
    return P(*out)


def fold_in(keys, data):
    """jax.random.fold_in for a key or an array of keys (a scanned layer stack holds one per layer)."""
    if keys.ndim == 0:
        return jax.random.fold_in(keys, data)
    return jax.vmap(lambda k: fold_in(k, data))(keys)


def fsdp_dim(spec: P) -> int:
    """The dimension sharded over fsdp, or -1."""
    for i, entry in enumerate(spec):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        if "fsdp" in names:
            if len(names) > 1:
                raise ConfigError(f"trainer.step=shard_map: a parameter dimension is sharded over {names}; map each "
                                  f"logical axis to fsdp alone in mesh.param_rules")
            return i
    return -1


def make_shard_map_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, clip_norm: float, lr_schedule,
                        mesh: jax.sharding.Mesh, shardings: TrainState, batch_spec: P, grad_accum: int = 1,
                        on_nan: str = "stop"):
    """`tx` must not clip: clipping needs the norm across slices and is done here."""
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    dims = [fsdp_dim(s.spec) for s in jax.tree.leaves(shardings.params)]
    # LoRA's frozen weights live in `rest`, sliced over fsdp like parameters: gathered, never updated.
    rest_dims = [fsdp_dim(v.get_value().spec) if is_var(v) else -1
                 for v in jax.tree.leaves(shardings.rest, is_leaf=is_var)]
    state_specs = jax.tree.map(lambda s: manual_spec(s.spec), shardings)
    if manual_spec(batch_spec) != P(MANUAL) and n_shards > 1:
        raise ConfigError(f"trainer.step=shard_map needs batches split over (data, fsdp); mesh.act_rules.batch gives "
                          f"{batch_spec}")

    def gather(p, dim):
        return p if dim < 0 else jax.lax.all_gather(p, "fsdp", axis=dim, tiled=True)

    def reduce(g, dim):
        if dim < 0:
            return jax.lax.psum(g, MANUAL) / n_shards
        return jax.lax.psum(jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True), "data") / n_shards

    def local_step(state: TrainState, batch: dict):
        p_leaves, p_def = jax.tree.flatten(state.params)
        full = jax.tree.unflatten(p_def, [gather(p, d) for p, d in zip(p_leaves, dims)])
        shard = jax.lax.axis_index(MANUAL)
        # Every other variable, one by one: frozen weights (LoRA) are gathered like parameters, RNG keys get this
        # shard's stream.
        r_vars, r_def = jax.tree.flatten(state.rest, is_leaf=is_var)
        rest = jax.tree.unflatten(r_def, [
            v.replace(gather(v.get_value(), d)) if isinstance(v, Frozen) else
            v.replace(fold_in(v.get_value(), shard)) if is_key(v.get_value()) else v
            for v, d in zip(r_vars, rest_dims)])
        model = nnx.merge(graphdef, full, rest)
        for _, m in nnx.iter_modules(model):  # batch norm: statistics of the global batch, as the jit step has them
            if isinstance(m, nnx.BatchNorm):
                m.axis_name = MANUAL
        with activation_sharding(None, None):  # inside the map the layout is explicit: no GSPMD constraints
            (loss, acc), grads = loss_and_grads(model, batch, grad_accum)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        # Frozen weights and RNG keys stay as they were (only counters move); batch statistics become the mean
        # over shards.
        new_rest = jax.tree.unflatten(r_def, [
            old if isinstance(old, Frozen) or is_key(old.get_value()) else
            new.replace(jax.lax.pmean(new.get_value(), MANUAL)) if jnp.issubdtype(new.get_value().dtype, jnp.floating)
            else new
            for old, new in zip(r_vars, jax.tree.leaves(new_rest, is_leaf=is_var))])
        g_leaves = [reduce(g, d) for g, d in zip(jax.tree.leaves(grads), dims)]
        sq_sliced = sum((jnp.sum(g.astype(jnp.float32) ** 2) for g, d in zip(g_leaves, dims) if d >= 0),
                        jnp.zeros(()))
        sq_whole = sum((jnp.sum(g.astype(jnp.float32) ** 2) for g, d in zip(g_leaves, dims) if d < 0),
                       jnp.zeros(()))
        grad_norm = jnp.sqrt(jax.lax.psum(sq_sliced, "fsdp") + sq_whole)
        if clip_norm > 0:  # the same rule as optax.clip_by_global_norm
            scale = jnp.where(grad_norm < clip_norm, 1.0, clip_norm / grad_norm)
            g_leaves = [g * scale.astype(g.dtype) for g in g_leaves]
        grads = jax.tree.unflatten(jax.tree.structure(grads), g_leaves)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": jax.lax.pmean(loss, MANUAL), "accuracy": jax.lax.pmean(acc, MANUAL),
                   "grad_norm": grad_norm, "lr": lr_schedule(state.step)}
        if "target_bytes" in batch:  # each shard's own, averaged (the jit step divides global sums)
            metrics["bits_per_byte"] = jax.lax.pmean(bits_per_byte(loss, batch), MANUAL)
        new = state.replace(step=state.step + 1, params=params, rest=new_rest, opt_state=opt_state)
        if on_nan == "skip":  # loss and norm are reduced over every shard: all shards skip together
            new = skip_unless(jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm), new, state)
        return new, metrics

    return jax.shard_map(local_step, mesh=mesh, in_specs=(state_specs, P(MANUAL)), out_specs=(state_specs, P()),
                         axis_names=set(MANUAL), check_vma=False)
