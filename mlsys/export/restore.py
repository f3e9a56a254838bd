"""Bring a finished run back: its saved config, its data (for shapes, held-out inputs, the vocabulary), and its
model with the checkpoint's parameters, in evaluation mode, on one device."""

import os
from dataclasses import dataclass

from flax import nnx

from mlsys import checkpoint, data
from mlsys.config import Config, DistConfig, load_saved
from mlsys.errors import CheckpointError
from mlsys.models.lora import merge_lora
from mlsys.models.prune import unmask
from mlsys.parallel import MeshConfig, make_mesh
from mlsys.train.build import restore_model


@dataclass
class LoadedRun:
    run_dir: str
    step: int
    cfg: Config
    dataset: data.Dataset
    model: nnx.Module  # evaluation mode; LoRA adapters merged
    env: dict


def load_run(run_dir: str, step: int | None = None, merge: bool = True) -> LoadedRun:
    """The run's model at its newest checkpoint (or `step`); a LoRA fine-tune with its adapters merged into the
    kernels unless merge=False."""
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run={run_dir!r}: no such directory; give a run dir (runs/<exp>/<time>)")
    cfg = load_saved(run_dir)
    if not checkpoint.has_checkpoint(run_dir):
        raise CheckpointError(f"run={run_dir!r} has no checkpoint; train it (with a final checkpoint) first")
    # Whatever mesh and number of processes it trained on, export restores its weights onto one device.
    cfg.mesh, cfg.dist = MeshConfig(), DistConfig()
    dataset = data.load(cfg.data, cfg.seed)
    eval_def, params, rest, step = restore_model(run_dir, cfg, dataset.spec, make_mesh(cfg.mesh), step)
    model = nnx.merge(eval_def, params, rest)
    if cfg.lora.rank and merge:  # a LoRA fine-tune exports as the plain model, the adapters folded into its kernels
        model = merge_lora(model)
    if cfg.prune.sparsity and merge:  # a pruned model exports as the plain model, its zeros in the kernels
        model = unmask(model)
    env_path = os.path.join(run_dir, "env.json")
    env = {}
    if os.path.isfile(env_path):
        import json

        env = json.load(open(env_path))
    return LoadedRun(os.path.abspath(run_dir), step, cfg, dataset, model, env)
