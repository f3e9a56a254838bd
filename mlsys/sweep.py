"""What makes a sweep's job dirs resumable: the `mlsys.job_dir` resolver used by conf/config.yaml.

Hydra numbers a sweep's jobs from 0 in every invocation, so running the same sweep command again after an
interruption would overwrite the first run dirs. With this resolver a rerun appends: job dirs continue after the ones
already in the sweep dir. (A Bayesian study resumes on its own: hydra_plugins/mlsys_optuna runs only the trials the
study stored in the sweep dir still lacks.)
"""

import os

from omegaconf import OmegaConf

_OFFSETS: dict[str, int] = {}  # sweep dir -> number of job dirs it held when this process first looked


def job_dir(sweep_dir: str, job_num: int) -> str:
    """The job's subdir name: its number, counted on from the job dirs a previous invocation left in the sweep
    dir. The count is taken once per process, before this process has created any job dir of its own."""
    key = os.path.abspath(sweep_dir)
    if key not in _OFFSETS:
        existing = [int(d) for d in (os.listdir(key) if os.path.isdir(key) else []) if d.isdigit()]
        _OFFSETS[key] = max(existing, default=-1) + 1
    return str(_OFFSETS[key] + int(job_num))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mlsys.job_dir"):
        OmegaConf.register_new_resolver("mlsys.job_dir", job_dir)
