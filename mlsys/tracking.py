"""Where metrics go: metrics.jsonl in the run dir (always; the source every later tool reads), wandb (offline
unless the user asked otherwise, every file inside the run dir) or MLflow (a file store in the run dir unless
MLFLOW_TRACKING_URI says otherwise), and env.json. Only process 0 writes. A tracker that cannot be reached never
costs a run (mlsys.trackers)."""

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata

import jax

from mlsys.trackers import MlflowRun, start_wandb

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "hydra-core", "omegaconf", "numpy",
            "wandb", "jaxtyping", "scikit-learn")


def git_info(path: str) -> dict:
    def git(*args):
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None, "dirty": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        info = {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
        if info["dirty"]:  # what the run's code was, beyond the commit
            info["diff"] = git("diff", "HEAD").stdout
        return info
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def code_version() -> dict:
    info = git_info(os.getcwd())
    if info["commit"] is None:
        info = git_info(os.path.dirname(os.path.abspath(__file__)))
    return info


def environment(extra: dict | None = None) -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "packages": versions,
        # The working directory's repository (a user's own models live there), else the one mlsys comes from.
        "git": code_version(),
        "devices": dict(Counter(d.device_kind for d in jax.devices())),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }


class Tracker:
    def __init__(self, run_dir: str, logger_cfg, config: dict, enabled: bool = True):
        self.run_dir, self.enabled, self.wandb_run, self.mlflow_run = run_dir, enabled, None, None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if logger_cfg.name == "wandb":
            self.wandb_run = start_wandb(run_dir, logger_cfg, config)
        if logger_cfg.name == "mlflow":
            self.mlflow_run = MlflowRun(run_dir, logger_cfg, config, logger_cfg.store_dir)

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{split}/{k}": float(v) for k, v in metrics.items()}, step=int(step))
        if self.mlflow_run is not None:
            self.mlflow_run.log(step, split, metrics)

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            with open(os.path.join(self.run_dir, name), "w") as f:
                json.dump(obj, f, indent=2, default=str)

    def write_env(self, env: dict) -> None:
        """env.json; a dirty working tree's diff goes beside it, in git.diff."""
        diff = env["git"].pop("diff", None)
        if diff is not None and self.enabled:
            with open(os.path.join(self.run_dir, "git.diff"), "w") as f:
                f.write(diff)
            env["git"]["diff_file"] = "git.diff"
            logging.getLogger("mlsys").warning("started from a git tree with uncommitted changes (%s); the diff is "
                                               "saved in %s", env["git"]["commit"][:12],
                                               os.path.join(self.run_dir, "git.diff"))
        self.write_json("env.json", env)

    def close(self, ok: bool = True) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow_run is not None:
            for name in ("config.yaml", "env.json"):
                self.mlflow_run.artifact(os.path.join(self.run_dir, name))
            self.mlflow_run.close(ok)
