"""Train an experiment: python -m experiments.run +exp=digits_mlp [key=value ...]"""

import time

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mlsys.cli import friendly_errors, summary
from mlsys.config import register, to_typed
from mlsys.train import train

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@friendly_errors
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    typed = to_typed(cfg)
    t0 = time.perf_counter()
    results = train(typed, run_dir)
    if jax.process_index() == 0:
        print(summary(typed.name, typed.trainer.steps, time.perf_counter() - t0, results, results["run_dir"]))
    return results.get("val", results["train"])["loss"]


if __name__ == "__main__":
    main()
