"""make bench: every suite's arms, each in its own process, interleaved, repeated; medians and ratios in one table
per suite, saved under benchmarks/results/ (JSON with every repeat, and Markdown).

    python -m benchmarks.run                  # all CPU suites, 5 repeats
    python -m benchmarks.run --suite cpu_gpt --repeats 7
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# suite -> (arms, size, steps, reference arm for ratios, what the ratios are checked against)
SUITES = {
    "cpu_gpt": (["mlsys", "jax", "torch"], "cpu", 100, "mlsys",
                "goals: mlsys within 3% of hand-written JAX (jax/mlsys ms ratio >= 0.97), mlsys tokens/s >= torch eager"),
    "pipeline": (["mlsys", "mlsys-grain"], "cpu", 100, "mlsys",
                 "goal: the grain pipeline within 3% of a device-resident batch"),
    "loop": (["loop-bare", "loop"], "cpu", 600, "loop-bare",
             "shakespeare_char's own loop (grain pipeline, log every 100, eval and checkpoint at 500) against a bare "
             "loop over the same compiled step and batches; goal: steady-state step time within 2%"),
    # steps = the run's training steps (shakespeare_char: 2000, evaluation and a checkpoint every 500)
    "run": (["run-torch", "run-mlsys"], "cpu", 2000, "run-torch",
            "a whole +exp=shakespeare_char run, launch to exit, against a hand-written PyTorch run of the same schedule "
            "and evaluation work (benchmarks/torch_run.py); ms_per_step = wall / steps; goal: mlsys <= 0.8x the wall"),
    "checkpoint": (["checkpoint"], "cpu", 200, "checkpoint",
                   "goal: each asynchronous save blocks the loop for at most 5% of the steps between saves"),
    "export_latency": (["latency-jax", "latency-ort", "latency-ort-int8"], "cpu", 0, "latency-jax",
                       "inference ms per call (model@batch); goal: ONNX Runtime fp32 no slower than JAX at batch 1"),
    # steps = MB of generated corpus for the large arm (0: 100 MB; the small arm a quarter)
    "tokenize": (["tokenize-small", "tokenize-large"], "cpu", 0, "tokenize-small",
                 "data=corpus tokenization from scratch (byte-level BPE, 4,096 ids, a worker per core) of a generated "
                 ".jsonl corpus; goal: peak resident memory the same for 25 MB and 100 MB"),
    "compile": (["compile-scan", "compile-unrolled"], "cpu", 0, "compile-scan",
                "train-step compile time, shakespeare_char's GPT at 2 and 24 layers; goal: with model.scan_layers=true "
                "the 24-layer step compiles in at most 1.5x the 2-layer one's time (unrolled beside it)"),
    "decode": (["decode-cached", "decode-uncached", "decode-ort"], "cpu", 0, "decode-uncached",
               "256 new tokens after a 64-token prompt, batch 1, shakespeare_char's GPT with block 320; goal: the KV "
               "cache >= 5x the tokens/s of the uncached sampler (which recomputes the window for every token); "
               "decode-ort: the export's decoder.onnx (ONNX Runtime, greedy, from numpy)"),
    # steps = measured seconds per concurrency level (0: serve_load's default, 5 s; 0.25 s at the tiny size)
    "serve": (["serve-batched", "serve-unbatched"], "cpu", 0, "serve-unbatched",
              "model server load test on loopback, digits MLP; goals at concurrency 64: dynamic batching >= 4x the "
              "throughput of max_batch=1, p99 <= 50 ms, zero errors"),
    # steps = measured seconds per concurrency level (0: completion_load's default, 5 s; 0.25 s at the tiny size)
    "serve_lm": (["lm-continuous", "lm-sequential"], "cpu", 0, "lm-sequential",
                 "/v1/completions load test on loopback, shakespeare_bpe_llama's model (4 layers, d=128, context 64, "
                 "BPE 1,024), streamed, prompts of 16 characters, 32 new tokens each; goal at concurrency 16: "
                 "continuous batching >= 4x the tokens/s of one completion at a time (max_batch=1), zero errors"),
}


ARM_TIMEOUT_S = 900


def run_group(cmd: list[str], timeout: float, **kwargs) -> tuple[int | None, str, str]:
    """Run `cmd` in a process group of its own; past `timeout` seconds kill the whole group (an arm's server or
    training run too, not only the arm) and return None as the exit code. Returns (code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr


def run_arm(arm: str, size: str, steps: float, env: dict) -> dict:
    module = ("benchmarks.serve_load" if arm.startswith("serve") else  # a server + its client
              "benchmarks.completion_load" if arm.startswith("lm-") else
              "benchmarks.tokenize" if arm.startswith("tokenize") else "benchmarks.arm")
    # A fraction only means something to the load tests (seconds); the other arms take whole steps.
    cmd = [sys.executable, "-m", module, "--arm", arm, "--size", size, "--steps",
           str(int(steps)) if steps == int(steps) else str(steps)]
    code, stdout, stderr = run_group(cmd, ARM_TIMEOUT_S, cwd=ROOT, env=env)
    if code is None:
        raise SystemExit(f"arm {arm} ran past {ARM_TIMEOUT_S} s: it and the processes it started were killed")
    if code:
        raise SystemExit(f"arm {arm} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def latency_table(suite: str, rows: dict, ref: str, note: str) -> str:
    cases = list(rows[ref][0]["latency_ms"])
    lines = [f"### {suite}", "", note, "", "| case | " + " | ".join(f"{a} ms" for a in rows) + " | " +
             " | ".join(f"{a} / {ref}" for a in rows if a != ref) + " |", "|---" * (1 + 2 * len(rows) - 1) + "|"]
    for case in cases:
        med = {a: statistics.median(r["latency_ms"][case] for r in reps) for a, reps in rows.items()}
        lines.append(f"| {case} | " + " | ".join(f"{med[a]:.3f}" for a in rows) + " | " +
                     " | ".join(f"{med[a] / med[ref]:.2f}" for a in rows if a != ref) + " |")
    return "\n".join(lines) + "\n"


def table(suite: str, rows: dict, ref: str, note: str) -> str:
    if "mb_per_s" in rows[ref][0]:
        from benchmarks.tokenize import table as tokenize_table

        return tokenize_table(suite, rows, note)
    if "lm_load" in rows[ref][0]:
        from benchmarks.completion_load import lm_table

        return lm_table(suite, rows, ref, note)
    if "load" in rows[ref][0]:
        from benchmarks.serve_load import load_table

        return load_table(suite, rows, ref, note)
    if "latency_ms" in rows[ref][0]:
        return latency_table(suite, rows, ref, note)
    if "compile_ratio" in rows[ref][0]:
        from benchmarks.lm import compile_table

        return compile_table(suite, rows, note)
    if "new_tokens" in rows[ref][0]:
        from benchmarks.lm import decode_table

        return decode_table(suite, rows, ref, note)
    keys = [k for k in ("ms_per_step", "cpu_ms_per_step", "tokens_per_s", "compile_s", "save_blocked_ms",
                        "blocked_fraction", "wall_s", "cpu_s", "load_avg")
            if any(k in r[0] for r in rows.values())]
    base = statistics.median(r["ms_per_step"] for r in rows[ref])
    lines = [f"### {suite}", "", note, "",
             "| arm | repeats | " + " | ".join(f"median {k}" for k in keys) + f" | ms/step ratio to {ref} |",
             "|---" * (len(keys) + 3) + "|"]
    for arm, reps in rows.items():
        med = {k: statistics.median(r.get(k, float("nan")) for r in reps) for k in keys}
        cells = " | ".join(f"{med[k]:.4g}" for k in keys)
        lines.append(f"| {arm} | {len(reps)} | {cells} | {med['ms_per_step'] / base:.3f} |")
    if "cpu_ms_per_step" in rows[ref][0]:  # CPU time per step: the steadier comparison on a shared machine
        cbase = statistics.median(r["cpu_ms_per_step"] for r in rows[ref])
        lines.append("")
        lines.append("CPU ms/step ratio to " + ref + ": " + ", ".join(
            f"{arm} {statistics.median(r['cpu_ms_per_step'] for r in reps) / cbase:.3f}" for arm, reps in rows.items()
            if all("cpu_ms_per_step" in r for r in reps)))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", choices=sorted(SUITES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=float, default=0, help="override every suite's steps per repeat (the load "
                   "suites: seconds per concurrency level, a fraction allowed)")
    p.add_argument("--size", default="", help="override every suite's model size (see benchmarks/sizes.py)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env.pop("XLA_FLAGS", None)  # one real device, as a user's run has
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    report = [f"# make bench, {stamp}", "", f"machine: {platform.platform()}, {os.cpu_count()} cores, "
              f"python {platform.python_version()}", ""]
    for suite in a.suite or list(SUITES):
        arms, size, steps, ref, note = SUITES[suite]
        size = a.size or size
        rows = {arm: [] for arm in arms}
        for r in range(a.repeats):  # interleaved: arm A, B, C, then A, B, C again, ...
            for arm in arms:
                rows[arm].append(run_arm(arm, size, a.steps or steps, env))
                print(f"[{suite}] repeat {r + 1}/{a.repeats} {arm}: {rows[arm][-1]['ms_per_step']:.2f} ms/step",
                      flush=True)
        text = table(suite, rows, ref, note)
        print("\n" + text, flush=True)
        report.append(text)
        with open(os.path.join(a.out, f"{suite}.json"), "w") as f:
            json.dump({"suite": suite, "size": size, "steps": steps, "when": stamp, "repeats": rows}, f, indent=1)
    with open(os.path.join(a.out, "latest.md"), "w") as f:
        f.write("\n".join(report))


if __name__ == "__main__":
    main()
