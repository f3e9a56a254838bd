"""What makes a sweep's job dirs resumable: the `mlsys.job_dir` resolver used by conf/config.yaml.

Hydra numbers a sweep's jobs from 0 in every invocation, so running the same sweep command again after an
interruption would overwrite the first run dirs. With this resolver a rerun appends: job dirs continue after the ones
already in the sweep dir. (A Bayesian study resumes on its own: hydra_plugins/mlsys_optuna runs only the trials the
study stored in the sweep dir still lacks.)
"""

import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# sweep dir -> number of job dirs it held when the current sweep invocation started. Per invocation, not per
# process: two sweeps launched in one process (tests, notebooks, a Python driver) must each count afresh, or the
# second reuses the first's offset and writes over its job dirs.
_OFFSETS: dict[str, int] = {}


def _count(key: str) -> int:
    existing = [int(d) for d in (os.listdir(key) if os.path.isdir(key) else []) if d.isdigit()]
    return max(existing, default=-1) + 1


def job_dir(sweep_dir: str, job_num: int) -> str:
    """The job's subdir name: its number, counted on from the job dirs a previous invocation left in the sweep
    dir. The count is taken when the invocation starts (JobDirs), before any job dir of its own exists; a process
    that JobDirs never ran in (a launcher's remote worker) takes it at its first job."""
    key = os.path.abspath(sweep_dir)
    if key not in _OFFSETS:
        _OFFSETS[key] = _count(key)
    return str(_OFFSETS[key] + int(job_num))


class JobDirs(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): a new sweep invocation forgets the previous one's
    counts, and counts its sweep dir before the launcher makes any job dir in it."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _OFFSETS.clear()
        key = os.path.abspath(str(config.hydra.sweep.dir))
        _OFFSETS[key] = _count(key)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mlsys.job_dir"):
        OmegaConf.register_new_resolver("mlsys.job_dir", job_dir)
