"""trainer.resume: what must not change between a run and its continuation.

The data position carries over exactly to any number of processes and any mesh (global batch b holds the same
examples however many processes read it), but only while the examples' order is the same: the data config (but
its evaluation keys) and the seed must be the run's."""

import os
from dataclasses import asdict

from mlsys.config import Config, load_saved
from mlsys.errors import ConfigError

# Keys that change what is evaluated, not the order of the training examples.
EVAL_ONLY = ("eval_batch_size", "eval_batches")


def check_same_data(resume_dir: str, cfg: Config) -> None:
    """Refuse to resume `resume_dir` with a data config or seed that would feed other examples than the run's."""
    if not os.path.isfile(os.path.join(resume_dir, "config.yaml")):
        return  # killed before it wrote its config: nothing to compare (its checkpoint, if any, is checked later)
    then = load_saved(resume_dir)
    before, now = asdict(then.data), asdict(cfg.data)
    differ = [f"data.{k}={before.get(k)!r} there, {now.get(k)!r} here" for k in sorted(set(before) | set(now))
              if k not in EVAL_ONLY and before.get(k) != now.get(k)]
    if then.seed != cfg.seed:
        differ.append(f"seed={then.seed} there, {cfg.seed} here")
    if differ:
        raise ConfigError(f"trainer.resume={resume_dir}: the data config changed since that run "
                          f"({'; '.join(differ)}), so its data position would not carry over; resume with the "
                          f"run's values (see {os.path.join(resume_dir, 'config.yaml')}) or start a new run")
