"""Everything a run needs before its first step: optimizer, sharded state, and the compiled-to-be step."""

from typing import Any, Callable, NamedTuple

import jax

from mlsys import checkpoint, hostmem
from mlsys.data.augment import augmenter, with_augment
from mlsys.optim import make_optimizer
from mlsys.parallel import batch_sharding, param_shardings
from mlsys.train.shard_step import make_shard_map_step
from mlsys.train.state import abstract_model, create_state, split_model
from mlsys.train.step import make_eval_step, make_train_step

class Trainer(NamedTuple):
    state: Any  # TrainState, sharded on the mesh
    shardings: Any  # the TrainState's NamedShardings
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates its state argument
    eval_step: Callable  # jitted (params, rest, batch) -> sums
    eval_def: Any  # graphdef in evaluation mode (sampling, export)
    batch_sharding: Any
    lr_schedule: Callable


def build(cfg, spec, mesh: jax.sharding.Mesh, total_steps: int) -> Trainer:
    """Create the state in its shards and the train step for `cfg.trainer.step` (jit or shard_map): one step
    function for every mesh, shardings given to jit as data."""
    kind = cfg.trainer.step
    if mesh.devices.flat[0].platform == "cpu":  # the step's scratch buffer reused, not mmapped afresh per step
        hostmem.keep_step_memory()
    _, abstract_params, _ = split_model(abstract_model(cfg.model, spec, cfg.seed, cfg.lora, cfg.prune),
                                     train=True)
    tx, lr_schedule = make_optimizer(cfg.optim, total_steps, abstract_params, clip=kind == "jit")
    train_def, eval_def, state, shardings = create_state(cfg.model, spec, cfg.seed, tx, mesh, cfg.mesh.param_rules,
                                                         cfg.lora, cfg.prune)
    put = batch_sharding(mesh, cfg.mesh.act_rules)
    if kind == "shard_map":
        step = make_shard_map_step(train_def, tx, cfg.optim.clip_norm, lr_schedule, mesh, shardings, put.spec,
                                   cfg.trainer.grad_accum, cfg.trainer.on_nan)
    else:
        step = make_train_step(train_def, tx, lr_schedule, cfg.trainer.grad_accum, cfg.trainer.on_nan)
    # data.augment (image sources): the batch is augmented on the device, keyed on (seed, step, row).
    d = cfg.data
    step = with_augment(step, augmenter(getattr(d, "augment", []), getattr(d, "crop_scale", None), cfg.seed))
    train_step = jax.jit(step, in_shardings=(shardings, put), out_shardings=(shardings, None), donate_argnums=0)
    return Trainer(state, shardings, train_step, jax.jit(make_eval_step(eval_def)), eval_def, put, lr_schedule)


def restore_model(run_dir: str, cfg, spec, mesh: jax.sharding.Mesh, step: int | None = None):
    """A saved run's weights (parameters, batch statistics, frozen and LoRA weights, RNG streams) placed on `mesh`
    by `cfg.mesh.param_rules`, from its newest readable checkpoint (or `step`), whatever number of processes and
    mesh wrote it; the optimizer state and data position are not read. Returns (eval graphdef, params, rest, step)."""
    eval_def, params, rest = split_model(abstract_model(cfg.model, spec, cfg.seed, cfg.lora, cfg.prune), train=False)
    abstract = {"params": params, "rest": rest}
    shardings = param_shardings(abstract, mesh, cfg.mesh.param_rules)
    weights, step = checkpoint.restore_weights(run_dir, checkpoint.abstract_like(abstract, shardings), step)
    return eval_def, weights["params"], weights["rest"], step
