"""Prune a trained run: a new run dir whose checkpoint holds the pruned weights and their masks. Fine-tune it with
`trainer.init_from=<pruned run>` (the masks come along and hold the pruned weights at zero); export it like any run
(the zeros stay, the manifest reports how far the files compress)."""

import json
import os
from dataclasses import asdict, replace
from types import SimpleNamespace

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from mlsys import checkpoint, data
from mlsys.config import load_saved
from mlsys.data.fingerprint import fingerprint
from mlsys.errors import CheckpointError, ConfigError
from mlsys.models.prune import PruneConfig, PruneMask, check, compute_mask
from mlsys.parallel import MeshConfig, make_mesh
from mlsys.tracking import Tracker, environment


def _flat(state) -> dict:
    return {p: v for p, v in nnx.to_flat_state(state)}


def prune_run(run_dir: str, sparsity: float, method: str = "magnitude", out: str | None = None) -> dict:
    """Prune `run_dir`'s newest checkpoint; returns {"run_dir", "sparsity", "before", "after", ...}: held-out
    metrics of the dense and the pruned model (no fine-tuning)."""
    from mlsys.train.build import build, restore_model
    from mlsys.train.loop import evaluate
    from mlsys.train.step import make_eval_step

    cfg_prune = PruneConfig(sparsity=sparsity, method=method)
    check(cfg_prune, key="prune")
    if not os.path.isdir(run_dir) or not checkpoint.has_checkpoint(run_dir):
        raise CheckpointError(f"run={run_dir!r}: not a run dir with a checkpoint; give runs/<exp>/<time> of a "
                              f"finished run")
    base = load_saved(run_dir)
    if base.lora.rank:
        raise ConfigError(f"run={run_dir!r} is a LoRA fine-tune; prune the run it fine-tuned "
                          f"({base.trainer.init_from}) or a plain run")
    if base.prune.sparsity:
        raise ConfigError(f"run={run_dir!r} is already pruned (sparsity {base.prune.sparsity}); prune the dense run "
                          f"it came from")
    out = os.path.abspath(out or f"{os.path.normpath(run_dir)}_pruned{round(100 * sparsity)}_{method}")
    if checkpoint.has_checkpoint(out):
        raise CheckpointError(f"out={out!r} already holds a checkpoint; choose another out=")
    # Restore onto one device, whatever mesh the run trained on.
    one = replace(base, mesh=MeshConfig(), trainer=replace(base.trainer, step="jit", grad_accum=1))
    dataset = data.load(one.data, one.seed)
    mesh = make_mesh(one.mesh)
    eval_def, params, rest, step = restore_model(run_dir, one, dataset.spec, mesh)
    dense = SimpleNamespace(params=params, rest=rest)
    pruned_cfg = replace(one, prune=cfg_prune)
    run = build(pruned_cfg, dataset.spec, mesh, one.trainer.steps)  # the masked model: all-ones masks

    # Every weight from the dense run; then each prunable kernel's mask from its values, and kernel x mask.
    found = _flat(dense.params) | _flat(dense.rest)
    new, counts = {}, {"kernels": 0, "weights": 0, "zeros": 0}
    for path, v in _flat(run.state.rest).items():
        if isinstance(v, PruneMask):
            kpath = (*path[:-1], "kernel")
            kernel = np.asarray(jax.device_get(found[kpath].get_value()))
            keep = compute_mask(kernel, sparsity, method)
            new[path], new[kpath] = keep, kernel * keep
            counts["kernels"] += 1
            counts["weights"] += keep.size
            counts["zeros"] += int((~keep).sum())

    def fill(st):
        flat = [(p, v.replace(jax.numpy.asarray(new[p])) if p in new else
                 v.replace(found[p].get_value()) if p in found else v) for p, v in nnx.to_flat_state(st)]
        return nnx.from_flat_state(flat)

    state = run.state.replace(step=jax.numpy.asarray(step, jax.numpy.int32), params=fill(run.state.params), rest=fill(run.state.rest))
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, run.state))

    def put(batch):
        return {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}

    results = {"run_dir": out, "source": os.path.abspath(run_dir), "step": int(step), "method": method,
               "sparsity": sparsity, "pruned_weights": counts, "before": {}, "after": {}}
    with jax.set_mesh(mesh):
        for split in ("val", "test"):
            if split in dataset.splits:
                results["before"][split] = evaluate(jax.jit(make_eval_step(eval_def)), dense, dataset.splits[split], one, put)
                results["after"][split] = evaluate(run.eval_step, state, dataset.splits[split], pruned_cfg, put)

    # The new run dir: config (the original mesh and trainer, with the prune settings), checkpoint, metrics, env.
    saved = replace(base, prune=cfg_prune)
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(saved), os.path.join(out, "config.yaml"))
    ckpt = checkpoint.Checkpointer(out, max_to_keep=1)
    ckpt.save(int(step), state, data.train_iterator(dataset.splits["train"], one.data.batch_size, one.seed))
    ckpt.close()
    data.save_meta(dataset, out)
    tracker = Tracker(out, replace(base.logger, name="jsonl"), asdict(saved))
    for split, m in results["after"].items():
        tracker.log(int(step), split, m)
    env = environment({"pruned_from": results["source"], "start_step": int(step), "prune": {
        **asdict(cfg_prune), **counts, "before": results["before"]}, "data": fingerprint(one.data, one.seed)})
    tracker.write_env(env)
    tracker.close()
    with open(os.path.join(out, "prune.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return results
