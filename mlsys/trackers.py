"""The external experiment trackers behind mlsys.tracking: wandb and MLflow. Neither may ever cost a run: a server
that cannot be reached, or a missing API key, gives one warning naming the cause, and the run goes on logging
locally (wandb offline into the run dir, to `wandb sync` later; MLflow into a file store in the run dir), within
seconds (a bounded TCP probe before any network client starts, and bounded client timeouts after it)."""

import fcntl
import json
import logging
import os
import socket
import time
from urllib.parse import urlparse

log = logging.getLogger("mlsys")

PROBE_TIMEOUT_S = 3.0  # a tracker's host that does not accept a TCP connection within this is unreachable
WANDB_INIT_TIMEOUT_S = 20  # wandb's own bound once the host answered (its default, 90 s with retries, was 98 s)
MLFLOW_LINK = "mlflow.json"  # in the run dir: which MLflow run holds this run (export adds its manifest there)

# wandb directories the user set before we started; the others are pointed into each run dir.
_USER_WANDB_DIRS = {v for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR") if v in os.environ}


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if `url`'s host accepts a TCP connection within `timeout` seconds, else why not (one phrase)."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url!r} is not a URL with a host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as e:
        return f"cannot resolve {host} ({e.strerror})"
    except TimeoutError:
        return f"{host}:{port} did not answer within {timeout:g} s"
    except OSError as e:
        return f"{host}:{port} refused the connection ({e.strerror or type(e).__name__})"


# --- wandb --------------------------------------------------------------------------------------------------------

def start_wandb(run_dir: str, cfg, config: dict):
    """A wandb run whose files live in the run dir: offline unless the user asked otherwise (logger.mode,
    WANDB_MODE, or WANDB_API_KEY set); online falls back to offline, with one warning, when it cannot start."""
    import wandb

    mode = cfg.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    home = os.path.join(run_dir, "wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        if var not in _USER_WANDB_DIRS:
            os.environ[var] = os.path.join(home, sub)
    os.environ.setdefault("WANDB_SILENT", "true")

    def init(mode: str):
        return wandb.init(project=cfg.project, entity=cfg.entity, mode=mode, dir=run_dir, config=config,
                          name=os.path.basename(run_dir), tags=list(cfg.tags), group=cfg.group,
                          reinit="finish_previous",
                          settings=wandb.Settings(console="off", x_disable_stats=True,
                                                  init_timeout=WANDB_INIT_TIMEOUT_S))

    if mode != "online":
        return init(mode)
    server = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    problem = unreachable(server)
    if problem is None:
        try:
            return init("online")
        except Exception as e:  # no API key, a rejected key, a server that stopped answering: all the same here
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    log.warning("wandb cannot log online (%s: %s); logging offline into %s instead — upload it later with "
                "`wandb sync %s`", server, problem, home, os.path.join(home, "offline-run-*"))
    return init("offline")


# --- MLflow -------------------------------------------------------------------------------------------------------

def _local_store(directory: str) -> str:
    # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set: a local, dependency-free
    # store inside the run dir is exactly what we want (no database, nothing outside the run dir).
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return "file://" + os.path.abspath(os.path.join(directory, "mlruns"))


def _bound_http_client() -> None:
    """MLflow's REST client retries 7 times with backoff by default (minutes against a dead server)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def mlflow_uri(run_dir: str, store_dir: str | None) -> str:
    """MLFLOW_TRACKING_URI when set and reachable; else a file store in `store_dir` (a sweep's dir) or the run dir."""
    local = _local_store(store_dir or run_dir)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return local
    if urlparse(uri).scheme in ("http", "https"):
        _bound_http_client()
        problem = unreachable(uri)
        if problem is not None:
            log.warning("MLflow cannot log to MLFLOW_TRACKING_URI=%s (%s); logging into the local store %s "
                        "instead (metrics.jsonl is complete either way)", uri, problem, local[len("file://"):])
            return local
    return uri


class MlflowRun:
    """One MLflow run for one mlsys run: the flattened config as params, every metrics.jsonl row as metrics, files
    as artifacts. In a sweep (`group` set) every run is a child of one parent run per sweep. A failure after the
    start (a server that went away) warns once and stops MLflow logging; the run itself goes on."""

    def __init__(self, run_dir: str, cfg, config: dict, store_dir: str | None = None):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.uri = mlflow_uri(run_dir, store_dir)
        self.client = MlflowClient(self.uri)
        self.failed = False
        exp = self.client.get_experiment_by_name(cfg.project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.project)
        tags = {"mlsys.run_dir": os.path.abspath(run_dir), **{f"tag.{t}": "1" for t in cfg.tags}}
        self.parent_id = None
        if cfg.group:
            self.parent_id = self._parent(exp_id, cfg.group, store_dir or run_dir)
            tags.update({"mlflow.parentRunId": self.parent_id, "mlsys.group": cfg.group})
        self.run_id = self.client.create_run(exp_id, run_name=os.path.basename(run_dir), tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(_flatten(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        with open(os.path.join(run_dir, MLFLOW_LINK), "w") as f:
            json.dump({"tracking_uri": self.uri, "run_id": self.run_id, "experiment_id": exp_id}, f)

    def _parent(self, exp_id: str, group: str, lock_dir: str) -> str:
        """The sweep's parent run, created by whichever of its runs comes first (a file lock: launchers may run
        the sweep's jobs in parallel)."""
        os.makedirs(lock_dir, exist_ok=True)
        with open(os.path.join(lock_dir, ".mlflow_parent.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = self.client.search_runs([exp_id], filter_string=f"tags.`mlsys.sweep` = '{group}'", max_results=1)
            if found:
                return found[0].info.run_id
            return self.client.create_run(exp_id, run_name=group, tags={"mlsys.sweep": group}).info.run_id

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self.failed = True
            log.warning("MLflow stopped logging (%s failed at %s: %s); metrics.jsonl has everything", what,
                        self.uri, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)

    def log(self, step: int, split: str, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(f"{split}/{k}", float(v), now, int(step)) for k, v in metrics.items()]
        self._guard("logging metrics", self.client.log_batch, self.run_id, metrics=rows)

    def artifact(self, path: str) -> None:
        if os.path.isfile(path):
            self._guard(f"uploading {os.path.basename(path)}", self.client.log_artifact, self.run_id, path)

    def close(self, ok: bool = True) -> None:
        self._guard("closing the run", self.client.set_terminated, self.run_id, "FINISHED" if ok else "FAILED")
        if self.parent_id:  # the sweep's parent ends with its latest run (it is reopened by the next one)
            self._guard("closing the sweep's run", self.client.set_terminated, self.parent_id)


def mlflow_attach(run_dir: str, path: str) -> bool:
    """Add a file (an export's manifest) to the MLflow run of `run_dir`, if it logged to MLflow. Never raises."""
    link = os.path.join(run_dir, MLFLOW_LINK)
    if not os.path.isfile(link):
        return False
    try:
        info = json.load(open(link))
        if info["tracking_uri"].startswith("file://"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        elif problem := unreachable(info["tracking_uri"]):
            log.warning("MLflow: cannot add %s to run %s (%s)", os.path.basename(path), info["run_id"], problem)
            return False
        else:
            _bound_http_client()
        from mlflow import MlflowClient

        MlflowClient(info["tracking_uri"]).log_artifact(info["run_id"], path)
        return True
    except Exception as e:
        log.warning("MLflow: cannot add %s to the run's MLflow record (%s)", os.path.basename(path),
                    str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return False


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
