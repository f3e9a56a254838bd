"""Launch recipes cannot run here (no cluster); what can be checked is: they parse, validate against the Kubernetes
schemas offline, compose with Hydra, and run the same command with the environment mlsys reads."""

import os

import kubernetes_validate
import pytest
import yaml

from tests.conftest import CONF, ROOT, compose_cfg

DEPLOY = os.path.join(ROOT, "deploy")


def docs(path):
    with open(os.path.join(DEPLOY, path)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def env_of(container):
    return {e["name"]: e["value"] for e in container.get("env", [])}


def check_worker(pod_spec, completions):
    (c,) = pod_spec["containers"]
    assert c["command"] == ["python", "-m", "experiments.run"]
    assert any(a.startswith("+exp=") for a in c["args"]) and "trainer.resume=auto" in c["args"]
    env = env_of(c)
    assert int(env["MLSYS_NUM_PROCESSES"]) == completions
    host, port = env["MLSYS_COORDINATOR"].rsplit(":", 1)
    assert int(port) in [p["containerPort"] for p in c["ports"]]
    return host


def test_indexed_job_and_service_validate_and_agree():
    service, job = docs("k8s/indexed-job.yaml")
    for d in (service, job):
        kubernetes_validate.validate(d, "1.30", strict=True)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    host = check_worker(spec["template"]["spec"], spec["completions"])
    # pod 0 of the Job, through the headless Service named in the pod's subdomain
    assert host == f"{job['metadata']['name']}-0.{spec['template']['spec']['subdomain']}"
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == spec["template"]["spec"]["subdomain"]


def test_jobset_names_its_coordinator_and_runs_the_same_command():
    (js,) = docs("k8s/jobset.yaml")
    assert js["apiVersion"].startswith("jobset.x-k8s.io/") and js["kind"] == "JobSet"
    (rj,) = js["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    # the Job template is a batch/v1 JobSpec: validate it as one
    kubernetes_validate.validate({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": job},
                                 "1.30", strict=True)
    host = check_worker(job["template"]["spec"], job["completions"])
    assert host == f"{js['metadata']['name']}-{rj['name']}-0-0.{js['metadata']['name']}"


def test_slurm_launcher_composes():
    cfg = compose_cfg(["+exp=shakespeare_char", "hydra/launcher=slurm"])
    assert cfg.name == "shakespeare_char"
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        full = compose(config_name="config", overrides=["+exp=shakespeare_char", "hydra/launcher=slurm"],
                       return_hydra_config=True)
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 1 and launcher.nodes == 2


def test_sbatch_and_dockerfile_run_the_same_entry_point():
    sbatch = open(os.path.join(DEPLOY, "slurm", "train.sbatch")).read()
    assert "--ntasks-per-node=1" in sbatch and "-m experiments.run" in sbatch
    docker = open(os.path.join(DEPLOY, "Dockerfile")).read()
    assert 'ENTRYPOINT ["python", "-m", "experiments.run"]' in docker and "constraints.txt" in docker
    assert "USER mlsys" in docker
    # +sweep=... needs the sweeper plugin and its extra inside the image.
    assert "COPY hydra_plugins ./hydra_plugins" in docker and '".[sweep,lm]"' in docker


def cluster_env(kind: str, i: int, port: int) -> dict:
    if kind == "slurm":  # what srun sets for task i of 2 on one node; jax derives the port from the job id
        return {"SLURM_JOB_ID": str(port - 61440), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
                "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}
    # what the Indexed Job manifest and Kubernetes set
    return {"JOB_COMPLETION_INDEX": str(i), "MLSYS_NUM_PROCESSES": "2", "MLSYS_COORDINATOR": f"127.0.0.1:{port}"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["slurm", "k8s"])
def test_cluster_environment_alone_forms_the_group(tmp_path, kind):
    """Two real processes given only the cluster's variables (no dist.* keys) join into one run, as on a cluster."""
    import json
    import random
    import subprocess
    import sys

    port = 61440 + random.randrange(4096)  # SLURM's port range in jax: 61440 + job id mod 4096
    args = ["+exp=digits_mlp", "logger=jsonl", "trainer.progress=false", "trainer.steps=4", "trainer.log_every=2",
            "model.hidden=[16]", "mesh=data", "data.batch_size=16", f"hydra.run.dir={tmp_path / 'run'}",
            "dist.timeout_s=60"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION", "MLSYS_"))}
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**base, **cluster_env(kind, i, port), "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                                   "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    env = json.load(open(tmp_path / "run" / "env.json"))
    assert env["process_count"] == 2 and env["device_count"] == 4


def test_serve_manifests_validate_and_agree_with_the_server():
    deployment, service, hpa = docs("k8s/serve.yaml")
    for d in (deployment, service, hpa):
        kubernetes_validate.validate(d, "1.30", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = c["ports"][0]
    assert f"serve.port={port['containerPort']}" in c["args"] and "serve.host=0.0.0.0" in c["args"]
    assert any(a.startswith("model=/models/") for a in c["args"])
    # keys from a Secret, never in the manifest; no root, nothing writable
    (env,) = c["env"]
    assert env["name"] == "MLSYS_API_KEYS" and "secretKeyRef" in env["valueFrom"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    drain = float(next(a for a in c["args"] if a.startswith("serve.drain_timeout_s=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] > drain + c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # the Service and the autoscaler point at this Deployment
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    from mlsys.serve.config import from_args

    args = dict(a.split("=", 1) for a in c["args"])
    cfg = from_args(args)  # every key the manifest sets is one the server knows, with a valid value
    assert cfg.port == port["containerPort"] and cfg.max_batch == 64


def test_serve_image_is_slim_non_root_and_runs_the_server():
    docker = open(os.path.join(DEPLOY, "serve", "Dockerfile")).read()
    assert 'ENTRYPOINT ["python", "-m", "experiments.serve"]' in docker and "constraints.txt" in docker
    # mlsys without its training stack (the serving path imports none of it: tests/test_serve.py), then the
    # server's own dependencies only.
    install = docker.split("RUN python -m venv")[1].split("\n\n")[0]
    assert "FROM python:3.11-slim" in docker and "pip install --no-deps ." in install
    assert all(dep in install for dep in ("fastapi", "uvicorn", "prometheus-client", "onnxruntime", "cryptography"))
    assert not any(heavy in install for heavy in ("torch", "jax", "flax", "orbax", "hydra", "wandb", "[serve]"))
    assert "USER 10001" in docker and "PYTHONDONTWRITEBYTECODE=1" in docker and "EXPOSE 8000" in docker
