"""The sweeper's config schema (`hydra/sweeper: mlsys_optuna`) and the Hydra plugin class.

Only Hydra is imported here: Hydra imports every public module of `hydra_plugins` at start-up, also in installs
without the `sweep` extra, so the Optuna side lives in `_study.py` and is imported when a sweep starts.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from mlsys.cli import friendly_errors


@dataclass
class OptunaSweeperConf:
    """`hydra.sweeper.*` of a Bayesian sweep. The study is resumable: `n_trials` is its total budget, counted over
    every invocation that shares `storage` and `study_name`."""

    _target_: str = "hydra_plugins.mlsys_optuna.optuna_sweeper.OptunaSweeper"
    direction: str = "minimize"  # or "maximize": what to do with the number each run returns
    storage: Optional[str] = None  # e.g. sqlite:///<sweep dir>/optuna.db; None keeps the study in memory
    study_name: Optional[str] = None
    n_trials: int = 20  # total finished trials (complete, pruned or failed) the study should hold
    n_jobs: int = 1  # trials asked for and handed to the launcher together
    sampler: str = "tpe"  # tpe | random
    # The sampler is seeded with seed + the trials already finished, so a resumed study draws new points.
    seed: int = 0
    max_failure_rate: float = 0.0  # failed trials per batch above this fraction stop the sweep
    # key -> Hydra override syntax: choice(a,b), interval(lo,hi), tag(log, interval(lo,hi)),
    # int(interval(lo,hi)), range(lo,hi,step), or a plain value that every trial gets
    params: Dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="mlsys_optuna", node=OptunaSweeperConf,
                             provider="mlsys")


class OptunaSweeper(Sweeper):
    """Runs Optuna trials through Hydra's launcher; each trial is one job whose return value is its score."""

    def __init__(self, direction: str, storage: Optional[str], study_name: Optional[str], n_trials: int,
                 n_jobs: int, sampler: str, seed: int, max_failure_rate: float, params: Dict[str, Any]) -> None:
        self.options = dict(direction=direction, storage=storage, study_name=study_name, n_trials=n_trials,
                            n_jobs=n_jobs, sampler=sampler, seed=seed, max_failure_rate=max_failure_rate,
                            params=dict(params or {}))

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    @friendly_errors  # a bad search space or a missing extra: one line and exit 2, like a bad run config
    def sweep(self, arguments: List[str]) -> None:
        from ._study import run_study

        run_study(self, arguments, **self.options)
