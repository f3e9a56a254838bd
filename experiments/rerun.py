"""Re-launch a run exactly as it was configured: python -m experiments.rerun <run dir> [key=value ...]

The run's recorded config.yaml is used as it is, not recomposed from conf/ (which may have changed since), in a
new run dir runs/<name>/<time>_<id>. Overrides given after the run dir apply on top and are recorded. If the code
has changed since the run (another commit, or the run came from a dirty tree), it says how to get that code back.
"""

import json
import os
import secrets
import sys
import time

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlsys.cli import friendly_errors, summary
from mlsys.config import Config, DistConfig, load_saved
from mlsys.errors import ConfigError
from mlsys.tracking import code_version


def recorded(run_dir: str, overrides: list[str]) -> Config:
    cfg = load_saved(run_dir)
    # How the run was launched (its processes, their coordinator) is not what it computes: a run trained by
    # `launch_local -n 2` reruns in this one process on the same mesh, unless dist.* overrides say otherwise.
    cfg.dist = DistConfig()
    if not overrides:
        return cfg
    bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
    if bad:
        raise ConfigError(f"{bad[0]!r}: after the run dir give key=value overrides of existing keys, e.g. seed=1")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override: {str(e).splitlines()[0]}") from None


def code_note(run_dir: str) -> str | None:
    """How to get the run's code back, if the checkout differs from what the run recorded."""
    path = os.path.join(run_dir, "env.json")
    then = json.load(open(path)).get("git", {}) if os.path.isfile(path) else {}
    now = code_version()
    notes = []
    if then.get("commit") and now.get("commit") and then["commit"] != now["commit"]:
        notes.append(f"the run used commit {then['commit'][:12]}, this checkout is at {now['commit'][:12]}: "
                     f"`git checkout {then['commit'][:12]}` for the same code")
    if then.get("dirty"):
        notes.append(f"the run came from uncommitted changes: `git apply {os.path.join(run_dir, 'git.diff')}` on "
                     f"that commit")
    return "; ".join(notes) or None


@friendly_errors
def main(argv: list[str]) -> None:
    if not argv or not os.path.isdir(argv[0]):
        raise ConfigError("usage: python -m experiments.rerun <run dir> [key=value ...], the run dir as printed by "
                          f"experiments.run (runs/<exp>/<time>){f'; {argv[0]!r} is not a directory' if argv else ''}")
    source, overrides = os.path.abspath(argv[0]), argv[1:]
    cfg = recorded(source, overrides)
    from mlsys.train import train

    run_dir = os.path.join("runs", cfg.name, time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3))
    os.makedirs(run_dir)
    note = code_note(source)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    with open(os.path.join(run_dir, "rerun.json"), "w") as f:
        json.dump({"of": source, "overrides": overrides, "code": note}, f, indent=2)
    hydra_overrides = os.path.join(source, ".hydra", "overrides.yaml")
    if os.path.isfile(hydra_overrides):  # the original command line, for reports
        os.makedirs(os.path.join(run_dir, ".hydra"))
        recorded_cli = OmegaConf.to_container(OmegaConf.load(hydra_overrides))
        OmegaConf.save(OmegaConf.create(recorded_cli + overrides), os.path.join(run_dir, ".hydra", "overrides.yaml"))
    t0 = time.perf_counter()
    results = train(cfg, run_dir)
    print(summary(cfg.name, cfg.trainer.steps, time.perf_counter() - t0, results, results["run_dir"]))


if __name__ == "__main__":
    main(sys.argv[1:])
