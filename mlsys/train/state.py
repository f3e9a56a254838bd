"""The train state, and its creation directly in its shards on the mesh."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mlsys.models import build_model
from mlsys.models.lora import LoRAConfig, add_lora
from mlsys.models.prune import PruneConfig, add_masks
from mlsys.parallel import check_param_names, param_shardings
from mlsys.spec import DataSpec


# XLA options for a computation that runs once (what JAX_DISABLE_MOST_OPTIMIZATIONS sets): a quick compile.
ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class TrainState(struct.PyTreeNode):
    # Fields hold arrays, or their abstract shapes under eval_shape; hence Any.
    step: Any  # int32 scalar: completed optimizer steps
    params: Any  # nnx.State of nnx.Param variables: what is trained (with LoRA, the adapters only)
    rest: Any  # nnx.State of every other model variable: RNG streams (dropout), batch statistics, frozen weights
    opt_state: Any


def split_model(model: nnx.Module, train: bool):
    """graphdef for training (dropout on, batch statistics updated) or evaluation, plus params and the rest."""
    view = nnx.view(model, deterministic=not train, use_running_average=not train, raise_if_not_found=False)
    return nnx.split(view, nnx.Param, ...)


def new_model(model_cfg, spec: DataSpec, seed: int, lora: LoRAConfig | None = None,
              prune: PruneConfig | None = None) -> nnx.Module:
    """The model a config describes; with lora.rank > 0, adapters on its linear layers and the rest frozen (only
    the adapters are nnx.Param, so only they are trained); with prune.sparsity > 0, a mask beside every prunable
    kernel (mlsys.models.prune)."""
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    model = build_model(model_cfg, spec, rngs)
    if prune is not None and prune.sparsity:
        model = add_masks(model)
    return add_lora(model, lora, rngs) if lora is not None and lora.rank else model


def abstract_model(model_cfg, spec: DataSpec, seed: int, lora: LoRAConfig | None = None,
                   prune: PruneConfig | None = None):
    """The model's structure without allocating it."""
    return nnx.eval_shape(lambda: new_model(model_cfg, spec, seed, lora, prune))


def create_state(model_cfg, spec: DataSpec, seed: int, tx, mesh, rules: dict, lora: LoRAConfig | None = None,
                 prune: PruneConfig | None = None):
    """Returns (train graphdef, eval graphdef, state, state shardings). The state is born sharded: its shapes come
    from eval_shape, its shardings from the parameters' logical names, and jit(init, out_shardings=...) creates
    each shard on its own device. Nothing is ever built whole on one device."""
    abstract = abstract_model(model_cfg, spec, seed, lora, prune)
    train_def, _, _ = split_model(abstract, train=True)
    eval_def, _, _ = split_model(abstract, train=False)

    def init() -> TrainState:
        model = new_model(model_cfg, spec, seed, lora, prune)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params))

    shapes = jax.eval_shape(init)
    check_param_names(shapes.params, rules)
    shardings = param_shardings(shapes, mesh, rules)
    # Initialisation runs once, so on CPU its compile time is all that counts: XLA's backend optimisations off
    # (shakespeare_char: 1.25 → 0.8-0.9 s; a few weights differ from an optimised compile in the last bit).
    options = ONCE if mesh.devices.flat[0].platform == "cpu" else None
    state = jax.jit(init, out_shardings=shardings, compiler_options=options)()
    return train_def, eval_def, state, shardings
