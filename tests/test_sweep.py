"""Sweeps through the real command line: Optuna studies that resume where they stopped, grids, the objective each
run returns, wandb groups, bad sweeps; and re-launching a run from its run dir. The commands run as `python -m ...`
does but in this process (tests/entry.py: a new process costs seconds of imports before its first line); a sweep
killed in the middle of a trial needs a process of its own."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlsys.config import register
from mlsys.report import find_runs, objective
from tests.conftest import BASE, CONF, PRESETS, ROOT
from tests.entry import run_main

SWEEPS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "sweep")) if f.endswith("_optuna.yaml"))
TINY_MLP = ["trainer.steps=20", "trainer.log_every=10", "trainer.eval_every=10", "model.hidden=[16]",
            "logger=jsonl", "trainer.progress=false"]


def preset_of(sweep: str) -> str:
    return {"digits_optuna": "digits_mlp"}.get(sweep, sweep.removesuffix("_optuna"))


def cli(cwd, *args, module="experiments.run") -> str:
    """`python -m module args` run in this process, which must succeed; its stdout."""
    code, out, err = run_main(module, list(args), cwd)
    assert code == 0, err[-3000:]
    return out


def test_every_preset_has_a_sweep_example():
    assert {preset_of(s) for s in SWEEPS} == set(PRESETS)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_example_composes_and_searches_real_keys(sweep):
    exp = preset_of(sweep)
    register()
    extra = [f"trainer.init_from=runs/{BASE[exp]}/x"] if exp in BASE else []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", [f"+exp={exp}", f"+sweep={sweep}", *extra], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and str(cfg.hydra.mode).endswith("MULTIRUN")
    # The study's direction agrees with how each run reduces its objective (last: a loss, minimised).
    assert sweeper.direction == {"min": "minimize", "max": "maximize", "last": "minimize"}[cfg.sweep.mode]
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", f"{sweep} searches {key}: no such key"


def study(sweep_dir):
    import optuna

    return optuna.load_study(study_name="tpe", storage=f"sqlite:///{sweep_dir}/optuna.db")


def test_optuna_sweep_resumes_where_it_stopped(tmp_path):
    args = ["+exp=digits_mlp", "+sweep=digits_optuna", *TINY_MLP]
    sweep_dir = tmp_path / "multirun" / "digits_mlp" / "optuna_tpe"
    cli(tmp_path, *args, "sweep.trials=2")
    assert sorted(os.listdir(sweep_dir)) == ["0", "1", "optimization_results.yaml", "optuna.db"]
    first = study(sweep_dir).trials
    assert [t.state.name for t in first] == ["COMPLETE", "COMPLETE"]
    # Each trial's value is the objective the run returned: the best val.accuracy in its metrics.jsonl.
    for t, run in zip(first, sorted(find_runs(str(sweep_dir)), key=lambda r: int(os.path.basename(r.path)))):
        assert t.value == objective(run, "val.accuracy", "max")

    # Killed in the middle of its third trial (a process of its own, to kill): the rerun runs only what is missing,
    # in new job dirs. It runs in this process, as the first sweep did: each invocation counts the job dirs afresh.
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *args, "sweep.trials=4",
                             "trainer.steps=400"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (sweep_dir / "2" / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (sweep_dir / "2").is_dir() and not (sweep_dir / "3").exists()
    cli(tmp_path, *args, "sweep.trials=4")
    trials = study(sweep_dir).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 4 and states.count("RUNNING") == 1  # the killed one stays marked running
    assert sorted(d for d in os.listdir(sweep_dir) if d.isdigit()) == ["0", "1", "2", "3", "4"]
    # The resumed sampler draws new points rather than replaying the first ones.
    lrs = [t.params["optim.lr"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(lrs)) == 4
    cli(tmp_path, *args, "sweep.trials=4")  # nothing left to do
    assert len(study(sweep_dir).trials) == 5


def test_search_space_from_hydra_override_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.mlsys_optuna._study import search_space

    space, fixed = search_space(
        {"model.act": "choice(relu, gelu)", "optim.lr": "tag(log, interval(1e-4, 1e-2))",
         "optim.warmup_steps": "int(interval(20, 200))", "trainer.steps": "range(10, 40, 10)",
         "model.dropout": "interval(0, 0.5)", "seed": "3"},
        ["+exp=digits_mlp", "model.dropout=0.1"])  # the command line's plain value wins over the search space
    assert space == {"model.act": CategoricalDistribution(["relu", "gelu"]),
                     "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
                     "optim.warmup_steps": IntDistribution(20, 200),
                     "trainer.steps": IntDistribution(10, 30, step=10)}  # Hydra's range excludes its stop
    assert fixed == ["seed=3", "+exp=digits_mlp", "model.dropout=0.1"]


@pytest.mark.parametrize("case", ["no optuna", "bad sampler", "bad key"])
def test_optuna_sweep_bad_input_fails_before_any_trial(tmp_path, monkeypatch, case):
    args = ["+exp=digits_mlp", "+sweep=digits_optuna", *TINY_MLP, "hydra.sweep.dir=sw"]
    if case == "no optuna":  # an install without the sweep extra: `import optuna` finds this module and fails
        (tmp_path / "blocked").mkdir()
        (tmp_path / "blocked" / "optuna.py").write_text("raise ModuleNotFoundError(\"No module named 'optuna'\")")
        monkeypatch.syspath_prepend(str(tmp_path / "blocked"))
        monkeypatch.delitem(sys.modules, "optuna", raising=False)  # an earlier test's import; put back afterwards
    elif case == "bad sampler":
        args.append("hydra.sweeper.sampler=cma")
    else:  # a search space over a key the config lacks
        (tmp_path / "conf" / "sweep").mkdir(parents=True)
        (tmp_path / "conf" / "sweep" / "bad.yaml").write_text(
            "# @package _global_\ndefaults: [optuna_base, _self_]\nhydra:\n  sweeper:\n    params:\n"
            "      optim.lrr: interval(0.1, 0.2)\n")
        args += ["+sweep=bad", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
        args.remove("+sweep=digits_optuna")
    code, _, err = run_main("experiments.run", args, tmp_path)
    message = {"no optuna": "error: Bayesian sweeps (+sweep=...) need Optuna (No module named 'optuna'): "
                            "pip install -e \".[sweep]\"",
               "bad sampler": "error: hydra.sweeper.sampler='cma': must be one of ['tpe', 'random']",
               "bad key": "Key 'lrr' not in 'OptimConfig'"}[case]
    assert code != 0 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "sw").exists() or not list((tmp_path / "sw").iterdir())


def test_grid_sweep_groups_wandb_runs_and_reports(tmp_path):
    cli(tmp_path, "-m", "+exp=digits_mlp", *TINY_MLP[:-2], "logger=wandb", "trainer.progress=false",
        "optim.lr=1e-3,1e-2", "sweep.objective=val.accuracy", "sweep.mode=max", "hydra.sweep.dir=sweep")
    runs = sorted(os.listdir(tmp_path / "sweep"))
    assert runs[:2] == ["0", "1"]
    for r in ("0", "1"):  # both runs carry the sweep's group in their (offline) wandb records
        blobs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "sweep" / r / "wandb") for f in fs
                 if f.endswith(".wandb")]
        assert blobs and any(b"digits_mlp/sweep" in open(b, "rb").read() for b in blobs)
    out = cli(tmp_path, "sweep", module="experiments.report")
    assert "report.md" in out
    table = open(tmp_path / "sweep" / "report.md").read()
    assert "max of val.accuracy" in table and "optim.lr" in table


def test_two_sweeps_in_one_process_each_number_on_from_the_dirs_there(tmp_path):
    """The job dir count (mlsys/sweep.py) is taken per sweep invocation: a second sweep into the same dir, in the
    same process, continues after the first one's job dirs instead of reusing its count and writing over them."""
    args = ["-m", "+exp=digits_mlp", *TINY_MLP]

    def seeds(sweep_dir):
        return {d: next(o for o in yaml.safe_load(open(tmp_path / sweep_dir / d / ".hydra" / "overrides.yaml"))
                        if o.startswith("seed=")) for d in os.listdir(tmp_path / sweep_dir) if d.isdigit()}

    cli(tmp_path, *args, "seed=0,1", "hydra.sweep.dir=sw")
    cli(tmp_path, *args, "seed=2", "hydra.sweep.dir=other")  # another sweep dir in between counts on its own
    cli(tmp_path, *args, "seed=3", "hydra.sweep.dir=sw")
    assert seeds("sw") == {"0": "seed=0", "1": "seed=1", "2": "seed=3"}
    assert seeds("other") == {"0": "seed=2"}


def test_sweep_over_a_key_that_does_not_exist(tmp_path):
    code, _, err = run_main("experiments.run", ["-m", "+exp=digits_mlp", "optim.lrr=1e-3,1e-2"], tmp_path)
    assert code != 0 and "Key 'lrr' not in 'OptimConfig'" in err
    assert not (tmp_path / "multirun").exists() or not any((tmp_path / "multirun").rglob("metrics.jsonl"))


@pytest.mark.parametrize("override,message", [
    ("sweep.objective=val.bleu", "sweep.objective='val.bleu': must be <split>.<metric>"),
    ("sweep.objective=accuracy", "must be <split>.<metric>"),
    ("sweep.mode=best", "sweep.mode='best': must be one of ['min', 'max', 'last']"),
])
def test_bad_objective_is_refused_before_training(tmp_path, override, message):
    code, _, err = run_main("experiments.run", ["+exp=digits_mlp", *TINY_MLP, override], tmp_path)
    assert code == 2 and message in err and not list(tmp_path.rglob("metrics.jsonl"))


def test_objective_from_a_split_the_data_lacks(tmp_path):
    from mlsys.config import validate
    from mlsys.errors import ConfigError
    from tests.conftest import typed_cfg

    with pytest.raises(ConfigError, match="data=text has no test split here; use val.loss"):
        validate(typed_cfg(["+exp=shakespeare_char", "sweep.objective=test.loss"]), n_devices=8)


def test_rerun_from_the_run_dir_is_bit_identical(tmp_path):
    cli(tmp_path, "+exp=digits_mlp", *TINY_MLP, "optim.lr=5e-3", "hydra.run.dir=first")
    out = cli(tmp_path, "first", module="experiments.rerun")
    (again,) = [tmp_path / "runs" / "digits_mlp" / d for d in os.listdir(tmp_path / "runs" / "digits_mlp")]
    assert str(os.path.relpath(again, tmp_path)) in out

    def losses(d):
        # every row with a loss (the "cost" row holds wall-clock figures, different in every run)
        return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl")) if "loss" in r]

    assert losses(tmp_path / "first") == losses(again)
    assert yaml.safe_load(open(again / "config.yaml")) == yaml.safe_load(open(tmp_path / "first" / "config.yaml"))
    assert "optim.lr=5e-3" in yaml.safe_load(open(again / ".hydra" / "overrides.yaml"))
    assert json.load(open(again / "rerun.json"))["of"] == str(tmp_path / "first")
    # Overrides on top are applied and recorded; a bad one, or a folder that is not a run, is a clear error.
    cli(tmp_path, "first", "seed=1", module="experiments.rerun")
    code, _, err = run_main("experiments.rerun", ["first", "optim.lrr=1"], tmp_path)
    assert code == 2 and "lrr" in err
    code, _, err = run_main("experiments.rerun", [str(tmp_path / "runs")], tmp_path)
    assert code == 2 and "not a run dir (no config.yaml)" in err
