"""The benchmark harness runs for real at a tiny size: every arm, the suite runner's table, the GPU script."""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT

# One thread for OpenMP (torch, BLAS): the arms are run for their results, not their speed, and idle OpenMP threads
# spin. The suite's XLA flags stay, less the simulated device count: the arms run on one device, as a user's do.
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1",
       "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")).strip()}
if not ENV["XLA_FLAGS"]:
    del ENV["XLA_FLAGS"]

# The arms run in a few processes (benchmarks.arm with several --arm), each paying the interpreter and import
# start-up once: JAX's own training arms; the foreign runtimes (ONNX Runtime, then torch, whose thread pools stay
# set for the rest of a process); the whole-run arms (each starts a run of its own).
GROUPS = [["mlsys", "mlsys-grain", "jax", "checkpoint", "loop-bare", "loop", "compile-scan", "compile-unrolled",
           "decode-cached", "decode-uncached"], ["latency-ort-int8", "torch"], ["run-mlsys", "run-torch"]]
STEPS = {"loop": 8, "loop-bare": 8, "checkpoint": 50, "run-mlsys": 4, "run-torch": 4}  # the loop arm needs a few
# log intervals; the checkpoint arm two saves (one every 25 steps); the rest 3 steps


def start_arms(names: list[str]):
    """One benchmarks.arm process running `names` in turn at the tiny size, its output going to temporary files
    (pipes would stall it while another group's output is being read)."""
    cmd = [sys.executable, "-m", "benchmarks.arm", "--size", "tiny"]
    for name in names:
        cmd += ["--arm", name, "--steps", str(STEPS.get(name, 3))]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out, stderr=err, text=True), out, err


def finish_arms(started) -> tuple[dict, str]:
    """({arm: its JSON line}, stderr) of a process start_arms started; an arm that failed has no line (the arms
    after it still ran) and its traceback is in stderr."""
    proc, out, err = started
    with out, err:
        try:
            proc.wait(timeout=900)
        finally:
            proc.kill()  # a no-op once it has exited
            proc.wait()
        out.seek(0)
        err.seek(0)
        rows = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
        return {r["arm"]: r for r in rows}, err.read()


def arms_of(item) -> list[str]:
    """The arms a test of this module asserts on: its `name` parameter, or those its `arms` mark names."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "name" in callspec.params:
        return [callspec.params["name"]]
    mark = item.get_closest_marker("arms")
    return list(mark.args) if mark else []


@pytest.fixture(scope="module")
def arm(request):
    """arm(name) -> that arm's JSON line at the tiny size. The arms of the session's selected tests of this module
    run once, up front, in the groups above (a process each, side by side); each test then only asserts on its
    arm's line. An arm no group ran (a test this fixture did not see) runs alone when asked for."""
    selected = set()
    for item in request.session.items:  # notebooks (nbmake) are session items too, and have no .module
        if getattr(item, "module", None) is request.module:
            selected.update(arms_of(item))
    started = [(names, start_arms(names)) for names in ([n for n in g if n in selected] for g in GROUPS) if names]
    results, stderr = {}, {}
    for names, proc in started:
        rows, err = finish_arms(proc)
        results.update(rows)
        stderr.update(dict.fromkeys(names, err))

    def get(name: str) -> dict:
        if name not in results and name not in stderr:
            rows, stderr[name] = finish_arms(start_arms([name]))
            results.update(rows)
        assert name in results, f"arm {name} failed:\n{stderr[name][-3000:]}"
        return results[name]

    return get


@pytest.mark.parametrize("name", ["mlsys", "mlsys-grain", "jax", "torch", "latency-ort-int8", "loop", "loop-bare"])
def test_each_arm_reports_its_speed(arm, name):
    r = arm(name)
    assert r["arm"] == name and r["ms_per_step"] > 0 and r["compile_s"] >= 0
    if name.startswith("latency"):
        assert set(r["latency_ms"]) == {f"{m}@{b}" for m in ("mlp", "cnn", "gpt") for b in (1, 64)}
    else:
        assert r["tokens_per_s"] > 0
    if name == "loop":  # the real loop's own logged step times, the warm-up interval left out
        assert r["log_intervals"] >= 2 and r["wall_s"] > 0 and r["cpu_ms_per_step"] > 0


@pytest.mark.parametrize("name", ["compile-scan", "compile-unrolled", "decode-cached", "decode-uncached"])
def test_language_model_arms(arm, name):
    """Compile time at 2 and (tiny size) 4 layers, scanned or unrolled; decode tokens/s with and without the cache."""
    r = arm(name)
    if name.startswith("compile"):
        assert r["compile_2_layers_s"] > 0 and r["compile_4_layers_s"] > 0 and r["deep_layers"] == 4
        assert r["compile_ratio"] == r["compile_4_layers_s"] / r["compile_2_layers_s"]
    else:
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 16


@pytest.mark.slow
@pytest.mark.arms("run-mlsys", "run-torch")
def test_whole_run_arms_time_a_run_from_launch_to_exit(arm):
    """The whole-run suite's two arms at a tiny size: experiments.run (shakespeare_char, 2 layers) and the
    hand-written PyTorch run of the same schedule, each a fresh process with its evaluations and checkpoints."""
    for name in ("run-mlsys", "run-torch"):
        r = arm(name)
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["ms_per_step"] == 1e3 * r["wall_s"] / 4


@pytest.mark.arms("checkpoint")
def test_checkpoint_arm_reports_blocked_time(arm):
    r = arm("checkpoint")
    assert r["saves"] == 2 and 0 < r["blocked_fraction"] and r["save_blocked_ms"] > 0


def test_suite_runner_writes_medians_and_ratios(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "pipeline", "--repeats", "2", "--steps",
                          "3", "--size", "tiny", "--out", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "latest.md").read_text()
    assert "| mlsys-grain | 2 |" in table and "ratio to mlsys" in table
    assert len(json.loads((tmp_path / "pipeline.json").read_text())["repeats"]["mlsys"]) == 2


def test_a_timed_out_arm_is_killed_with_what_it_started(tmp_path):
    """benchmarks.run kills an arm past its time limit together with its children (a server, a training run),
    which would otherwise run on and skew every later arm."""
    import time

    from benchmarks.run import run_group

    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
              f"time.sleep(60)")
    t0 = time.perf_counter()
    code, stdout, _ = run_group([sys.executable, "-c", script], timeout=3)
    assert code is None and "started" in stdout and time.perf_counter() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; the child's exit is seen a moment later
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the arm's child {child} survived the arm's timeout")
    assert run_group([sys.executable, "-c", "print('ok')"], timeout=30) == (0, "ok\n", "")


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
    """make bench's /v1/completions load test at the tiny size: the session's char GPT export, 0.25 s per level."""
    env = {**ENV, "MLSYS_BENCH_LM_MODEL": serve_exports["gpt"]}
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "serve_lm", "--repeats", "1", "--size",
                          "tiny", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lm-continuous / lm-sequential tokens/s" in (tmp_path / "latest.md").read_text()
    reps = json.loads((tmp_path / "serve_lm.json").read_text())["repeats"]
    for arm in ("lm-continuous", "lm-sequential"):
        load = reps[arm][0]["lm_load"]
        assert set(load) == {"c1", "c16", "c64"}
        assert all(v["errors"] == 0 and v["tokens"] > 0 and v["ttft_p99_ms"] >= v["ttft_p50_ms"] > 0
                   for v in load.values()), load
