"""The benchmark harness runs for real at a tiny size: every arm, the suite runner's table, the GPU script."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
ENV.pop("XLA_FLAGS", None)


def arm(name, size="tiny", steps=3):
    steps = 8 if name.startswith("loop") else steps  # the loop arm needs a few log intervals
    out = subprocess.run([sys.executable, "-m", "benchmarks.arm", "--arm", name, "--size", size, "--steps", str(steps)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mlsys", "mlsys-grain", "jax", "torch", "latency-ort-int8", "loop", "loop-bare"])
def test_each_arm_reports_its_speed(name):
    r = arm(name)
    assert r["arm"] == name and r["ms_per_step"] > 0 and r["compile_s"] >= 0
    if name.startswith("latency"):
        assert set(r["latency_ms"]) == {f"{m}@{b}" for m in ("mlp", "cnn", "gpt") for b in (1, 64)}
    else:
        assert r["tokens_per_s"] > 0
    if name == "loop":  # the real loop's own logged step times, the warm-up interval left out
        assert r["log_intervals"] >= 2 and r["wall_s"] > 0 and r["cpu_ms_per_step"] > 0


@pytest.mark.parametrize("name", ["compile-scan", "compile-unrolled", "decode-cached", "decode-uncached"])
def test_language_model_arms(name):
    """Compile time at 2 and (tiny size) 4 layers, scanned or unrolled; decode tokens/s with and without the cache."""
    r = arm(name)
    if name.startswith("compile"):
        assert r["compile_2_layers_s"] > 0 and r["compile_4_layers_s"] > 0 and r["deep_layers"] == 4
        assert r["compile_ratio"] == r["compile_4_layers_s"] / r["compile_2_layers_s"]
    else:
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 16


@pytest.mark.slow
def test_whole_run_arms_time_a_run_from_launch_to_exit():
    """The whole-run suite's two arms at a tiny size: experiments.run (shakespeare_char, 2 layers) and the
    hand-written PyTorch run of the same schedule, each a fresh process with its evaluations and checkpoints."""
    for name in ("run-mlsys", "run-torch"):
        r = arm(name, steps=4)
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["ms_per_step"] == 1e3 * r["wall_s"] / 4


def test_checkpoint_arm_reports_blocked_time():
    r = arm("checkpoint", steps=50)
    assert r["saves"] == 2 and 0 < r["blocked_fraction"] and r["save_blocked_ms"] > 0


def test_suite_runner_writes_medians_and_ratios(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "pipeline", "--repeats", "2", "--steps",
                          "3", "--size", "tiny", "--out", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "latest.md").read_text()
    assert "| mlsys-grain | 2 |" in table and "ratio to mlsys" in table
    assert len(json.loads((tmp_path / "pipeline.json").read_text())["repeats"]["mlsys"]) == 2


@pytest.mark.slow
def test_gpu_script_runs_at_tiny_size_on_cpu(tmp_path):
    env = {**ENV, "SIZE": "tiny", "REPEATS": "1", "STEPS": "2", "PY": sys.executable, "OUT": str(tmp_path)}
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| torch-compile |" in out.stdout and "| mlsys |" in out.stdout and "| jax |" in out.stdout


def test_tokenize_suite_reports_throughput_and_peak_memory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "tokenize", "--repeats", "1", "--steps",
                          "2", "--out", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reps = json.loads((tmp_path / "tokenize.json").read_text())["repeats"]
    small, large = reps["tokenize-small"][0], reps["tokenize-large"][0]
    assert 0.4 < small["corpus_mb"] < large["corpus_mb"] and large["mb_per_s"] > 0 and large["tokens"] > 0
    assert large["peak_rss_mb"] > 0 and large["worker_peak_rss_mb"] > 0
    assert "| tokenize-large | 1 |" in (tmp_path / "latest.md").read_text()


def test_completion_load_suite_runs_both_arms(serve_exports, tmp_path):
    """make bench's /v1/completions load test at a tiny size: the session's char GPT export, 1 s per level."""
    env = {**ENV, "MLSYS_BENCH_LM_MODEL": serve_exports["gpt"]}
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "serve_lm", "--repeats", "1", "--steps",
                          "1", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lm-continuous / lm-sequential tokens/s" in (tmp_path / "latest.md").read_text()
    reps = json.loads((tmp_path / "serve_lm.json").read_text())["repeats"]
    for arm in ("lm-continuous", "lm-sequential"):
        load = reps[arm][0]["lm_load"]
        assert set(load) == {"c1", "c16", "c64"}
        assert all(v["errors"] == 0 and v["tokens"] > 0 and v["ttft_p99_ms"] >= v["ttft_p50_ms"] > 0
                   for v in load.values()), load
