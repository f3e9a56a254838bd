"""What makes a sweep resumable: two OmegaConf resolvers used by conf/config.yaml and conf/sweep/*.yaml.

Hydra numbers a sweep's jobs from 0 in every invocation, and the Optuna sweeper runs `n_trials` new trials every
time it starts. Running the same sweep command again after an interruption would therefore overwrite the first run
dirs and run the whole budget again. With these resolvers a rerun appends: job dirs continue after the ones already
in the sweep dir, and an Optuna study stored in the sweep dir runs only the trials it still lacks.
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


def trials_left(storage: str, study_name: str, total: int) -> int:
    """`total` minus the trials the stored study has already finished."""
    return max(0, int(total) - trials_done(storage, study_name))


def trials_done(storage: str, study_name: str) -> int:
    """Trials the stored study has finished (complete, pruned or failed); 0 for a new study. A trial that was
    running when the sweep was interrupted is not counted: it runs again. Also the sampler's seed, so that a resumed
    sweep draws new points instead of replaying the first ones."""
    import optuna

    if storage.startswith("sqlite:///"):
        # Optuna opens the database before Hydra creates the sweep dir.
        os.makedirs(os.path.dirname(os.path.abspath(storage[len("sqlite:///"):])), exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet: a fresh sweep
        return 0
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=done))


def register_resolvers() -> None:
    for name, fn in (("mlsys.job_dir", job_dir), ("mlsys.trials_left", trials_left),
                     ("mlsys.trials_done", trials_done)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
