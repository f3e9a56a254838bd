"""mlsys's Hydra sweeper for Bayesian search with a current Optuna (`pip install -e ".[sweep]"`).

Hydra finds sweepers in the `hydra_plugins` namespace package; this one registers `hydra/sweeper: mlsys_optuna`
(conf/sweep/optuna_base.yaml selects it). Importing it needs only Hydra: Optuna is imported when a sweep starts.
"""
