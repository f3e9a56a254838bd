"""Bring a finished run back: its saved config, its data (for shapes, held-out inputs, the vocabulary), and its
model with the checkpoint's parameters, in evaluation mode, on one device."""

import os
from dataclasses import dataclass

from flax import nnx
from omegaconf import OmegaConf

from mlsys import checkpoint, data
from mlsys.config import Config, register
from mlsys.data.sources import CONFIGS as DATA_CONFIGS
from mlsys.errors import CheckpointError, ConfigError
from mlsys.models import REGISTRY
from mlsys.parallel import MeshConfig, make_mesh
from mlsys.train.build import build


@dataclass
class LoadedRun:
    run_dir: str
    step: int
    cfg: Config
    dataset: data.Dataset
    model: nnx.Module  # evaluation mode
    env: dict


def load_config(run_dir: str) -> Config:
    """The typed config a run was trained with (config.yaml, written by the loop; else Hydra's copy)."""
    path = next((p for p in (os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, ".hydra", "config.yaml"))
                 if os.path.isfile(p)), None)
    if path is None:
        raise CheckpointError(f"run={run_dir!r}: not a run dir (no config.yaml); give runs/<exp>/<time>")
    register()
    raw = OmegaConf.load(path)
    try:
        schema = OmegaConf.structured(Config)
        schema.model = OmegaConf.structured(REGISTRY[raw.model.name][0])
        schema.data = OmegaConf.structured(DATA_CONFIGS[raw.data.name])
        return OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except Exception as e:
        raise ConfigError(f"{path}: cannot read the run's config ({str(e).splitlines()[0]})") from None


def load_run(run_dir: str, step: int | None = None) -> LoadedRun:
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run={run_dir!r}: no such directory; give a run dir (runs/<exp>/<time>)")
    cfg = load_config(run_dir)
    if not checkpoint.has_checkpoint(run_dir):
        raise CheckpointError(f"run={run_dir!r} has no checkpoint; train it (with a final checkpoint) first")
    cfg.mesh = MeshConfig()  # whatever mesh it trained on, export restores onto one device
    cfg.trainer.step, cfg.trainer.grad_accum = "jit", 1
    dataset = data.load(cfg.data, cfg.seed)
    run = build(cfg, dataset.spec, make_mesh(cfg.mesh), cfg.trainer.steps)
    it = data.train_iterator(dataset.splits["train"], cfg.data.batch_size, cfg.seed)
    state, step = checkpoint.restore(run_dir, checkpoint.abstract_like(run.state, run.shardings), it, step)
    model = nnx.merge(run.eval_def, state.params, state.rest)
    env_path = os.path.join(run_dir, "env.json")
    env = {}
    if os.path.isfile(env_path):
        import json

        env = json.load(open(env_path))
    return LoadedRun(os.path.abspath(run_dir), step, cfg, dataset, model, env)
