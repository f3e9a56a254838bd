"""The Optuna side of the sweeper: search space from Hydra's override syntax, a resumable study, the trial loop.

Resuming is the study's job, not the caller's: the study lives in `storage` (conf/sweep/optuna_base.yaml puts it in
the sweep dir), `n_trials` is the total it should hold, and an invocation asks only for the trials still missing.
A trial that was running when the sweep was killed stays marked RUNNING and is not counted, so it runs again.
"""

import logging
import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from omegaconf import OmegaConf

from mlsys.errors import ConfigError, MlsysError

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")
DIRECTIONS = ("minimize", "maximize")


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise MlsysError(f"Bayesian sweeps (+sweep=...) need Optuna ({e}): pip install -e \".[sweep]\"") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module logs one line per trial itself
    return optuna


def _scalar_values(override: Override) -> list:
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    bad = [v for v in values if not isinstance(v, (str, int, float, bool, type(None)))]
    if bad:
        raise ConfigError(f"hydra.sweeper.params.{override.get_key_element()}: Optuna chooses among numbers, strings "
                         f"and booleans only, got {bad[0]!r}; name the alternatives (e.g. a config group option)")
    return values


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override (choice, range, interval; `log` tag for a log scale)."""
    d = _optuna().distributions
    if override.is_choice_sweep():
        return d.CategoricalDistribution(_scalar_values(override))
    if override.is_range_sweep():
        values, step = _scalar_values(override), override.value().step
        if all(isinstance(v, int) for v in values) and isinstance(step, int) and step > 0 and values:
            return d.IntDistribution(values[0], values[-1], step=step)  # Hydra's range excludes its stop
        return d.CategoricalDistribution(values)
    if override.is_interval_sweep():
        sweep = override.value()
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return d.IntDistribution(sweep.start, sweep.end, log=log_scale)
        return d.FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ConfigError(f"{override.input_line}: not a sweep Optuna can sample (use choice, range or interval)")


def search_space(params: dict, arguments: list[str]) -> tuple[dict, list[str]]:
    """(key -> distribution, fixed overrides) from hydra.sweeper.params then the command line; a key given on the
    command line as a plain value is fixed at that value (it wins over the config's search space)."""
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    by_key: dict[str, Override] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        by_key.pop(override.get_key_element(), None)  # the later one wins, in the later one's place
        by_key[override.get_key_element()] = override
    space = {k: distribution(o) for k, o in by_key.items() if o.is_sweep_override()}
    fixed = [o.input_line for o in by_key.values() if not o.is_sweep_override()]
    return space, fixed


def trial_overrides(params: dict, fixed: list[str]) -> tuple[str, ...]:
    return tuple(f"{k}={v}" for k, v in params.items()) + tuple(fixed)


def finished_trials(study) -> int:
    """Trials that count toward the budget: complete, pruned or failed (not a RUNNING one left by a kill)."""
    s = _optuna().trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(s.COMPLETE, s.PRUNED, s.FAIL)))


def make_sampler(name: str, seed: int):
    samplers = _optuna().samplers
    return {"tpe": samplers.TPESampler, "random": samplers.RandomSampler}[name](seed=seed)


def run_study(sweeper, arguments: list[str], *, direction: str, storage: str | None, study_name: str | None,
              n_trials: int, n_jobs: int, sampler: str, seed: int, max_failure_rate: float, params: dict) -> None:
    """Run the trials `study_name` in `storage` still lacks to hold `n_trials` finished ones."""
    optuna = _optuna()
    for key, value, allowed in (("direction", direction, DIRECTIONS), ("sampler", sampler, SAMPLERS)):
        if value not in allowed:
            raise ConfigError(f"hydra.sweeper.{key}={value!r}: must be one of {list(allowed)}")
    if n_jobs < 1 or not 0.0 <= max_failure_rate <= 1.0:
        raise ConfigError(f"hydra.sweeper: n_jobs={n_jobs} must be >= 1 and max_failure_rate={max_failure_rate} "
                         "within [0, 1]")
    space, fixed = search_space(params, arguments)
    # A key that does not exist fails here, before a study or a run dir is created.
    sweeper.validate_batch_is_legal([trial_overrides({k: _some_value(d) for k, d in space.items()}, fixed)])

    if storage and storage.startswith("sqlite:///"):  # Optuna opens the database before the launcher makes the dir
        os.makedirs(os.path.dirname(os.path.abspath(storage[len("sqlite:///"):])), exist_ok=True)
    study = optuna.create_study(study_name=study_name, storage=storage, direction=direction, load_if_exists=True)
    done = finished_trials(study)
    study.sampler = make_sampler(sampler, seed + done)
    log.info(f"Optuna study {study.study_name!r} ({storage or 'in memory'}): {done} of {n_trials} trials finished, "
             f"{sampler} sampler seeded {seed + done}, {direction} over {list(space)}")

    job_idx, left = 0, n_trials - done
    while left > 0:
        trials = [study.ask(space) for _ in range(min(n_jobs, left))]
        returns = sweeper.launcher.launch([trial_overrides(t.params, fixed) for t in trials], initial_job_idx=job_idx)
        job_idx, left = job_idx + len(returns), left - len(returns)
        failed = []
        for trial, ret in zip(trials, returns):
            try:
                value = float(ret.return_value)  # a failed job re-raises its exception here
            except Exception as e:  # noqa: BLE001 — any failure of a trial is recorded as FAIL
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.warning(f"trial {trial.number} failed: {e}")
                failed.append(ret)
                continue
            study.tell(trial, value)
            log.info(f"trial {trial.number}: {value:.6g} {trial.params}")
        if failed and len(failed) / len(returns) > max_failure_rate:
            failed[0].return_value  # noqa: B018 — re-raises the first failure with its traceback
    _write_results(sweeper.config.hydra.sweep.dir, study)


def _some_value(d) -> Any:
    """A value inside distribution `d`, only to check that the overrides compose."""
    return d.choices[0] if hasattr(d, "choices") else d.low


def _write_results(sweep_dir: str, study) -> None:
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return
    best = study.best_trial
    log.info(f"best: trial {best.number}, {best.value:.6g} {best.params}")
    os.makedirs(sweep_dir, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"name": "optuna", "study": study.study_name, "best_trial": best.number,
                                     "best_params": best.params, "best_value": best.value,
                                     "finished_trials": finished_trials(study)}),
                   os.path.join(sweep_dir, "optimization_results.yaml"))
