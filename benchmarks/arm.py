"""One benchmark arm, alone in this process (so arms never share caches, threads or allocators); prints one JSON
line. Run through benchmarks.run, which interleaves the arms and repeats them, one process per arm.

    python -m benchmarks.arm --arm mlsys --size cpu --steps 100

`--arm` given several times runs those arms one after another in this process, a JSON line each (`--steps` once
for all, or once per arm, in order): the tests do this to pay the interpreter and import start-up once per group
of arms rather than once per arm. Their timings are then not independent measurements (shared caches and
allocators); measure with benchmarks.run.

    python -m benchmarks.arm --size tiny --arm mlsys --steps 3 --arm loop --steps 8
"""

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from benchmarks import lm
from benchmarks.sizes import SIZES, Size, mlsys_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_of(size: Size, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, size.vocab, (size.batch, size.seq_len + 1), dtype=np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def mlsys_setup(size: Size, extra=()):
    """mlsys's own training step (the compiled step experiments.run uses) on one device, and its config."""
    import jax
    from hydra import compose, initialize_config_dir

    from mlsys.config import register, to_typed
    from mlsys.spec import DataSpec
    from mlsys.parallel import make_mesh
    from mlsys.train.build import build

    register()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = to_typed(compose(config_name="config", overrides=[*mlsys_overrides(size), *extra]))
    mesh = make_mesh(cfg.mesh)
    run = build(cfg, DataSpec("lm", (size.seq_len,), "int32", size.vocab), mesh, 10_000)

    def put(x, y):
        return {"inputs": jax.device_put(x, run.batch_sharding), "targets": jax.device_put(y, run.batch_sharding)}

    return cfg, mesh, run, put


CPU_MS = {}  # the last timed() run's CPU ms per step (this process, all threads): steadier than wall time on a
# shared machine, where other jobs stretch the wall clock but not the work done


def timed(step, steps: int, sync) -> float:
    """Steady-state ms per step: `steps` dispatched back to back, one sync at the end (as the loop runs)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = None
    for _ in range(steps):
        out = step()
    sync(out)
    CPU_MS["cpu_ms_per_step"] = 1e3 * (time.process_time() - c0) / steps
    return 1e3 * (time.perf_counter() - t0) / steps


def arm_mlsys(size: Size, steps: int, grain: bool = False) -> dict:
    import jax

    from mlsys import data
    from mlsys.parallel import activation_sharding

    cfg, mesh, run, put = mlsys_setup(size)
    x, y = batch_of(size)
    batch = put(x, y)
    state = run.state
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        t0 = time.perf_counter()
        step_fn = run.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        it = None
        if grain:  # the real input pipeline: tiny Shakespeare windows through grain, one batch per step
            ds = data.load(cfg.data, 0)
            it = data.train_iterator(ds.splits["train"], size.batch, 0)
        box = {"state": state}

        def one():
            b = batch if it is None else {k: jax.device_put(v, run.batch_sharding) for k, v in next(it).items()}
            box["state"], m = step_fn(box["state"], b)
            return m

        for _ in range(3):
            jax.block_until_ready(one())
        ms = timed(one, steps, jax.block_until_ready)
    return {"compile_s": compile_s, "ms_per_step": ms}


def arm_jax(size: Size, steps: int) -> dict:
    import jax

    from benchmarks import handwritten_jax as hw

    params = hw.init(size, jax.random.key(0))
    step, opt_state = hw.make_step(size, params)
    x, y = (jax.device_put(a) for a in batch_of(size))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, x, y).compile()
    compile_s = time.perf_counter() - t0
    box = {"p": params, "o": opt_state}

    def one():
        box["p"], box["o"], loss = compiled(box["p"], box["o"], x, y)
        return loss

    for _ in range(3):
        jax.block_until_ready(one())
    return {"compile_s": compile_s, "ms_per_step": timed(one, steps, jax.block_until_ready)}


def arm_torch(size: Size, steps: int, compile: bool = False) -> dict:
    import torch

    from benchmarks import handwritten_torch as hw

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    step = hw.make_step(size, device, compile)
    x, y = (torch.from_numpy(a.astype(np.int64)).to(device) for a in batch_of(size))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda *_: None)
    t0 = time.perf_counter()
    for _ in range(3):  # torch.compile compiles here; eager warms its allocator
        step(x, y)
    sync()
    compile_s = time.perf_counter() - t0
    ms = timed(lambda: step(x, y), steps, lambda _: sync())
    return {"compile_s": compile_s, "ms_per_step": ms, "torch": torch.__version__, "threads": torch.get_num_threads()}


def arm_checkpoint(size: Size, steps: int, every: int = 25) -> dict:
    """The loop's view of an asynchronous orbax save: how long `save` blocks, against the steps between saves."""
    import tempfile

    import jax

    from mlsys import data
    from mlsys.checkpoint import Checkpointer
    from mlsys.parallel import activation_sharding

    cfg, mesh, run, put = mlsys_setup(size)
    batch = put(*batch_of(size))
    ds = data.load(cfg.data, 0)
    it = data.train_iterator(ds.splits["train"], size.batch, 0)
    with tempfile.TemporaryDirectory() as tmp, jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        ckpt = Checkpointer(tmp, max_to_keep=2)
        step_fn = run.train_step.lower(run.state, batch).compile()
        state, blocked, t_start = run.state, [], None
        for i in range(1, steps + 1):
            if i == 4:
                jax.block_until_ready(state)
                t_start = time.perf_counter()
            state, m = step_fn(state, batch)
            if i % every == 0:
                # The loop fetches metrics (a sync) before every save, so the state is ready: what remains is
                # the time the save itself holds the loop (device-to-host copy, then the write goes on behind).
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                ckpt.save(i, state, it)
                blocked.append(time.perf_counter() - t0)
        jax.block_until_ready(state)
        total = time.perf_counter() - t_start
        ckpt.close()
    step_ms = 1e3 * (total - sum(blocked)) / (steps - 3)
    save_ms = 1e3 * float(np.median(blocked))
    return {"ms_per_step": step_ms, "save_blocked_ms": save_ms, "saves": len(blocked),
            "blocked_fraction": save_ms / (every * step_ms)}


def loop_config(size: Size, steps: int):
    """The preset's config as `experiments.run` would train it for `steps` steps: its data pipeline, logging,
    evaluation and checkpoint cadence (the log interval shortened only when `steps` holds fewer than 4 of them)."""
    from hydra import compose, initialize_config_dir

    from mlsys.config import register, to_typed

    register()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = to_typed(compose(config_name="config", overrides=[*mlsys_overrides(size), f"trainer.steps={steps}"]))
    cfg.trainer.log_every = min(cfg.trainer.log_every, max(1, steps // 4))
    return cfg


def arm_loop(size: Size, steps: int) -> dict:
    """experiments.run's own loop (mlsys.train.train) end to end; steady-state ms/step is the median of the step
    times it logged, leaving out the first log interval (warm-up). Evaluation is not step time (the loop itself
    leaves it out); checkpoint saves and everything else the loop does per step are. CPU ms/step: this process's
    CPU time (all threads: XLA's, orbax's save thread) from the first to the last log step, less the evaluations,
    read where the loop logs (a wrapper around Tracker.log that only notes the clock)."""
    import tempfile

    from mlsys.tracking import Tracker
    from mlsys.train import train

    cfg = loop_config(size, steps)
    marks = []  # (step, split, process CPU seconds) at each tracker.log call
    log = Tracker.log

    def noting(self, step, split, metrics):
        marks.append((int(step), split, time.process_time()))
        return log(self, step, split, metrics)

    Tracker.log = noting
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            t0 = time.perf_counter()
            results = train(cfg, run_dir)
            wall = time.perf_counter() - t0
            rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    finally:
        Tracker.log = log
    times = [r["step_time_ms"] for r in rows if r.get("split") == "train" and "step_time_ms" in r][1:]
    train_marks = [(s, c) for s, split, c in marks if split == "train"]
    (s0, c0), (s1, c1) = train_marks[0], train_marks[-1]
    # An evaluation runs right after its step's train log and ends at its val log.
    evals = sum(c - dict(train_marks)[s] for s, split, c in marks if split == "val" and s0 <= s < s1)
    return {"compile_s": results["compile_seconds"], "ms_per_step": float(np.median(times)), "wall_s": wall,
            "cpu_ms_per_step": 1e3 * (c1 - c0 - evals) / (s1 - s0), "log_intervals": len(times),
            "log_every": cfg.trainer.log_every}


def arm_loop_bare(size: Size, steps: int) -> dict:
    """The same compiled step over the same batches as `arm_loop`, in a bare Python loop: the batches drawn from the
    same grain pipeline and placed on the device beforehand, no logging, evaluation or checkpoints."""
    import jax

    from mlsys import data
    from mlsys.parallel import activation_sharding, make_mesh
    from mlsys.train.build import build

    cfg = loop_config(size, steps)
    mesh = make_mesh(cfg.mesh)
    ds = data.load(cfg.data, cfg.seed)
    it = data.train_iterator(ds.splits["train"], cfg.data.batch_size, cfg.seed)
    run = build(cfg, ds.spec, mesh, steps)

    def put(batch: dict) -> dict:  # as the loop places a batch
        return {k: jax.make_array_from_process_local_data(run.batch_sharding, v) for k, v in batch.items()}

    batches = [put(next(it)) for _ in range(steps)]
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        t0 = time.perf_counter()
        step_fn = run.train_step.lower(run.state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        box = {"state": run.state, "i": 0}

        def one():
            box["state"], m = step_fn(box["state"], batches[box["i"] % steps])
            box["i"] += 1
            return m

        warm = min(cfg.trainer.log_every, steps // 2)  # the loop's first (left out) log interval
        for _ in range(warm):
            one()
        jax.block_until_ready(box["state"])
        ms = timed(one, steps - warm, jax.block_until_ready)
    return {"compile_s": compile_s, "ms_per_step": ms}


def run_schedule(size: Size, steps: int) -> tuple[int, int, int, int]:
    """(n_layer, d_model, eval_every, eval_batches) of the whole-run arms: shakespeare_char's own at the cpu size,
    a small model evaluated on 2 batches otherwise (the tests)."""
    if size == SIZES["cpu"]:
        return size.n_layer, size.d_model, max(1, steps // 4), 200
    return 2, 64, max(1, steps // 4), 2


def arm_run(size: Size, steps: int, torch: bool) -> dict:
    """A whole training run in a fresh process, timed from launch to exit (imports, data, compile, training,
    evaluation, checkpoints, the sample): `python -m experiments.run +exp=shakespeare_char`, or the hand-written
    PyTorch run of the same schedule and evaluation work (benchmarks/torch_run.py)."""
    import resource
    import subprocess
    import sys
    import tempfile

    n_layer, d_model, every, batches = run_schedule(size, steps)
    with tempfile.TemporaryDirectory() as out:
        if torch:
            cmd = ["-m", "benchmarks.torch_run", "--steps", str(steps), "--eval-every", str(every), "--eval-batches",
                   str(batches), "--n-layer", str(n_layer), "--d-model", str(d_model), "--out", out]
        else:
            cmd = ["-m", "experiments.run", "+exp=shakespeare_char", f"trainer.steps={steps}",
                   f"trainer.eval_every={every}", f"trainer.ckpt_every={every}", f"data.eval_batches={batches}",
                   f"model.n_layer={n_layer}", f"model.d_model={d_model}", "logger=jsonl", "trainer.progress=false",
                   "trainer.compile_cache=", f"hydra.run.dir={out}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "ms_per_step": 1e3 * wall / steps, "compile_s": 0.0}


NAMES = {"digits_mlp": "mlp", "digits_cnn": "cnn", "shakespeare_char": "gpt"}
# The latency arms' models at the tiny size (the tests): the same three architectures, small enough that exporting,
# quantizing and timing them takes seconds.
TINY_LATENCY = {"digits_mlp": ["model.hidden=[32]"], "digits_cnn": ["model.channels=[4,8]", "model.hidden=16"],
                "shakespeare_char": ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=16",
                                     "data.seq_len=16"]}


def arm_latency(size: Size, runtime: str) -> dict:
    """Inference latency (ms per call, each call waited for) of the digits MLP and CNN and the shakespeare GPT at
    batch 1 and 64: jax.jit, or ONNX Runtime on the exported model (fp32 or INT8). At the tiny size, small models
    of the same three kinds and fewer timed calls."""
    import tempfile

    import jax
    from flax import nnx
    from hydra import compose, initialize_config_dir

    from mlsys.config import register, to_typed
    from mlsys.data import load
    from mlsys.export.onnx_export import export_view, ort_run, ort_session, quantize_int8, to_onnx
    from mlsys.models import build_model, family_of

    register()
    tiny = size == SIZES["tiny"]
    out = {}
    exports = tempfile.TemporaryDirectory()  # every exported model of this arm, removed when it returns
    for exp in ("digits_mlp", "digits_cnn", "shakespeare_char"):
        overrides = [f"+exp={exp}", *(TINY_LATENCY[exp] if tiny else [])]
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            cfg = to_typed(compose(config_name="config", overrides=overrides))
        spec = load(cfg.data, 0).spec
        model = export_view(build_model(cfg.model, spec, nnx.Rngs(0)))
        if runtime != "jax":
            tmp = os.path.join(exports.name, exp)
            os.makedirs(tmp)
            path = os.path.join(tmp, "model.onnx")
            to_onnx(model, spec, path, family_of(cfg.model).max_len(cfg.model))
            if runtime == "ort-int8":
                quantize_int8(path, os.path.join(tmp, "q.onnx"))
                path = os.path.join(tmp, "q.onnx")
            sess = ort_session(path)
        fn = jax.jit(lambda x: model(x))
        for batch in (1, 64):
            shape = (batch, *spec.input_shape)
            x = np.zeros(shape, np.int32) if spec.task == "lm" else np.random.rand(*shape).astype(np.float32)
            call = (lambda: fn(x).block_until_ready()) if runtime == "jax" else (lambda: ort_run(sess, x))
            for _ in range(2 if tiny else 5):
                call()
            n = (200 if batch == 1 else 30) // (10 if tiny else 1)
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            out[f"{NAMES[exp]}@{batch}"] = 1e3 * (time.perf_counter() - t0) / n
    exports.cleanup()
    return {"latency_ms": out, "ms_per_step": out["mlp@1"], "compile_s": 0.0}


ARMS = {
    "mlsys": lambda s, n: arm_mlsys(s, n),
    "mlsys-grain": lambda s, n: arm_mlsys(s, n, grain=True),
    "jax": arm_jax,
    "torch": lambda s, n: arm_torch(s, n),
    "torch-compile": lambda s, n: arm_torch(s, n, compile=True),
    "checkpoint": arm_checkpoint,
    "loop": arm_loop,
    "loop-bare": arm_loop_bare,
    "run-mlsys": lambda s, n: arm_run(s, n, torch=False),
    "run-torch": lambda s, n: arm_run(s, n, torch=True),
    "latency-jax": lambda s, n: arm_latency(s, "jax"),
    "latency-ort": lambda s, n: arm_latency(s, "ort"),
    "latency-ort-int8": lambda s, n: arm_latency(s, "ort-int8"),
    "compile-scan": lambda s, n: lm.arm_compile(s, scan=True),
    "compile-unrolled": lambda s, n: lm.arm_compile(s, scan=False),
    "decode-cached": lambda s, n: lm.arm_decode(s, cached=True),
    "decode-uncached": lambda s, n: lm.arm_decode(s, cached=False),
    "decode-ort": lambda s, n: lm.arm_decode_ort(s),
}


def run_one(arm: str, size_name: str, steps: int) -> dict:
    """One arm's JSON line (as a process of its own prints it). Process-wide state an arm may leave behind is put
    back, so that a later arm in the same process starts as it would alone: the environment, jax's configuration
    (when jax is already imported), and the CPU time noted by timed() (an arm that does not call it must not report
    the last one's). Threads are not: keep arms that change them (torch's pools) last or in their own process."""
    size = SIZES[size_name]
    env = dict(os.environ)
    jax_cfg = dict(sys.modules["jax"].config.values) if "jax" in sys.modules else None
    CPU_MS.clear()
    try:
        out = {"arm": arm, "size": size_name, **ARMS[arm](size, steps), **CPU_MS, "load_avg": os.getloadavg()[0]}
    finally:
        CPU_MS.clear()
        os.environ.clear()
        os.environ.update(env)
        if jax_cfg is not None:
            config = sys.modules["jax"].config
            for name, value in jax_cfg.items():
                if config.values.get(name) != value:
                    config.update(name, value)
    if "latency_ms" not in out and "tokens_per_s" not in out:  # training arms: tokens of one step
        out["tokens_per_s"] = size.batch * size.seq_len / (out["ms_per_step"] / 1e3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=sorted(ARMS), required=True, action="append",
                   help="the arm to run; several: run them one after another, a JSON line each")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--steps", type=int, action="append", help="steps per repeat (default 100): once for every arm, "
                   "or once per --arm, in the same order")
    a = p.parse_args(argv)
    steps = a.steps or [100]
    if len(steps) not in (1, len(a.arm)):
        p.error(f"--steps given {len(steps)} times for {len(a.arm)} arms: give it once, or once per --arm")
    steps = steps * len(a.arm) if len(steps) == 1 else steps
    if len(a.arm) > 1:  # imported before the first arm, so that run_one can put back what any arm changes in it
        import jax  # noqa: F401
    failed = []
    for arm, n in zip(a.arm, steps):
        try:
            print(json.dumps(run_one(arm, a.size, n)), flush=True)
        except (Exception, SystemExit) as e:  # the next arms still run; this one has no line and the exit is 1
            if len(a.arm) == 1:
                raise
            print(f"arm {arm} failed:", file=sys.stderr)
            traceback.print_exception(e, file=sys.stderr)
            failed.append(arm)
    if failed:
        print(f"failed arms: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
