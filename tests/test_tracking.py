"""Experiment trackers: a tracker that cannot be reached never costs a run (wandb falls back to offline, MLflow to
a local store, one warning each, metrics.jsonl complete); an MLflow run read back with MLflow's own client."""

import json
import os
import socket

import pytest

from mlsys.config import LoggerConfig
from mlsys.tracking import Tracker


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}"


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_wandb_online_with_an_unreachable_server_logs_offline(tmp_path, monkeypatch, caplog, closed_port):
    monkeypatch.setenv("WANDB_BASE_URL", closed_port)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with caplog.at_level("WARNING", logger="mlsys"):
        t = Tracker(str(tmp_path), LoggerConfig(name="wandb", mode="online"), {"seed": 0})
    t.log(1, "train", {"loss": 2.0})
    t.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "refused" in warnings[0] and "wandb sync" in warnings[0], warnings
    assert any(n.startswith("offline-run-") for n in os.listdir(tmp_path / "wandb"))
    assert rows(tmp_path) == [{"step": 1, "split": "train", "loss": 2.0}]


def test_wandb_online_without_an_api_key_logs_offline(tmp_path, monkeypatch, caplog):
    server = socket.socket()  # a host that accepts connections: the missing key is what stops wandb
    server.bind(("127.0.0.1", 0))
    server.listen()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    import wandb

    wandb.teardown()  # forget a key an earlier test in this process gave wandb
    try:
        with caplog.at_level("WARNING", logger="mlsys"):
            t = Tracker(str(tmp_path), LoggerConfig(name="wandb", mode="online"), {})
        t.close()
    finally:
        server.close()
    assert any("API key" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert any(n.startswith("offline-run-") for n in os.listdir(tmp_path / "wandb"))


def test_mlflow_with_an_unreachable_server_logs_locally(tmp_path, monkeypatch, caplog, closed_port):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port)
    with caplog.at_level("WARNING", logger="mlsys"):
        t = Tracker(str(tmp_path), LoggerConfig(name="mlflow"), {"optim": {"lr": 0.1}})
    t.log(3, "val", {"loss": 1.5})
    t.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "MLFLOW_TRACKING_URI" in warnings[0] and "refused" in warnings[0], warnings
    link = json.load(open(tmp_path / "mlflow.json"))
    assert link["tracking_uri"] == f"file://{tmp_path}/mlruns"
    run = MlflowClient(link["tracking_uri"]).get_run(link["run_id"])
    assert run.data.metrics == {"val/loss": 1.5} and run.data.params == {"optim.lr": "0.1"}
    assert rows(tmp_path) == [{"step": 3, "split": "val", "loss": 1.5}]


def test_mlflow_sweep_runs_share_one_parent(tmp_path):
    from mlflow import MlflowClient

    cfg = LoggerConfig(name="mlflow", group="exp/sweep1", store_dir=str(tmp_path))
    links = []
    for job in ("0", "1"):
        t = Tracker(str(tmp_path / job), cfg, {"job": job})
        t.close()
        links.append(json.load(open(tmp_path / job / "mlflow.json")))
    client = MlflowClient(links[0]["tracking_uri"])
    parents = {client.get_run(link["run_id"]).data.tags["mlflow.parentRunId"] for link in links}
    assert len(parents) == 1 and client.get_run(parents.pop()).info.run_name == "exp/sweep1"


@pytest.mark.slow
def test_mlflow_run_reads_back_with_mlflows_client(train_tiny):
    from mlflow import MlflowClient

    from mlsys.trackers import mlflow_attach

    _, run_dir = train_tiny("digits_mlp", "logger=mlflow")
    link = json.load(open(os.path.join(run_dir, "mlflow.json")))
    assert link["tracking_uri"] == f"file://{run_dir}/mlruns"  # inside the run dir
    client = MlflowClient(link["tracking_uri"])
    run = client.get_run(link["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["optim.name"] == "adamw"
    logged = rows(run_dir)
    for split in ("train", "val", "test"):
        want = [(r["step"], r["loss"]) for r in logged if r["split"] == split]
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{split}/loss")]
        assert want and sorted(got) == sorted(want)
    manifest = os.path.join(run_dir, "manifest.json")
    open(manifest, "w").write("{}")  # what export adds after it wrote an export folder
    assert mlflow_attach(run_dir, manifest)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "env.json", "manifest.json"}
