"""Train an experiment: python -m experiments.run +exp=digits_mlp [key=value ...]

Returns the run's objective (sweep.objective, reduced by sweep.mode over what the run logged) to Hydra, so that
every sweeper — a multirun grid, Optuna — optimises the same number the report ranks runs by."""

import os
import sys
import time

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mlsys.cli import friendly_errors, summary
from mlsys.config import check_preset_model, register, to_typed
from mlsys.report import run_objective
from mlsys.train import train

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    typed = to_typed(cfg)
    if hc.mode == RunMode.MULTIRUN and typed.logger.group is None:
        # One wandb group (MLflow parent run) per sweep: <experiment>/<sweep dir name>.
        typed.logger.group = f"{typed.name}/{os.path.basename(os.path.normpath(hc.sweep.dir))}"
    if hc.mode == RunMode.MULTIRUN and typed.logger.store_dir is None:
        typed.logger.store_dir = hc.sweep.dir  # a sweep's MLflow runs share one local store
    t0 = time.perf_counter()
    results = train(typed, run_dir)
    if jax.process_index() != 0:  # process 0 alone writes metrics.jsonl
        return None
    print(summary(typed.name, typed.trainer.steps, time.perf_counter() - t0, results, results["run_dir"]))
    return run_objective(results["run_dir"], typed.sweep.objective, typed.sweep.mode)


if __name__ == "__main__":
    # Before Hydra composes: a preset's model keys against another model group, in one line.
    friendly_errors(check_preset_model)(sys.argv[1:], os.path.join(os.path.dirname(__file__), "..", "conf"))
    main()
