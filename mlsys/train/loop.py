"""The training loop, top to bottom: checks → mesh → data → state → resume → compile → loop → final evaluation."""

import logging
import os
import time
from dataclasses import asdict

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf
from tqdm import tqdm

from mlsys import checkpoint, cost, data, generate
from mlsys.accel import log_platform
from mlsys.config import Config, validate
from mlsys.data.checks import check_batches, check_vocab
from mlsys.data.fingerprint import fingerprint, warn_if_changed
from mlsys.errors import Preempted
from mlsys.models import family_of, lora
from mlsys.models.family import check_fits
from mlsys.perf import enable_compile_cache, peak_tflops
from mlsys.parallel import activation_sharding, bytes_per_device, init_distributed, make_mesh, shared_run_dir
from mlsys.tracking import Tracker, environment
from mlsys.train.build import build
from mlsys.train.guard import NumericsGuard
from mlsys.train.pretrained import apply_hf_model, hf_folder, inherit_prune, load_pretrained
from mlsys.train.resume import check_same_data

log = logging.getLogger("mlsys")


def evaluate(eval_fn, state, split, cfg: Config, put) -> dict:
    """Mean loss (per token for language models), accuracy and, where the data records the bytes each example
    covers, bits per byte over a split (all of it, or data.eval_batches fixed batches)."""
    d = cfg.data
    # Every batch's sums stay on the device until one fetch at the end, and are added up on the host: an eager
    # jnp.add per batch would be a dispatch each and (a small computation runs inline) wait for that batch.
    outs = [eval_fn(state.params, state.rest, put(batch))
            for batch in data.eval_batches(split, d.eval_batch_size or d.batch_size, d.eval_batches, seed=cfg.seed,
                                           process_index=jax.process_index(), process_count=jax.process_count())]
    totals = {k: np.sum([o[k] for o in jax.device_get(outs)], dtype=np.float64) for k in outs[0]}
    out = {"loss": totals["loss"] / totals["count"], "accuracy": totals["accuracy"] / totals["count"]}
    if "bytes" in totals:  # language models: total nats / (ln 2 x the bytes of text the targets cover)
        out["bits_per_byte"] = float(totals["loss"] / (np.log(2) * max(totals["bytes"], 1)))
    return out


def train(cfg: Config, run_dir: str) -> dict:
    """Train as `cfg` says, writing into `run_dir`. Returns the final metrics by split."""
    t, d = cfg.trainer, cfg.data
    started = time.perf_counter()  # the devices are held (and billed) from here

    # --- Processes: join the others (multi-host) before touching a device; all write into process 0's run dir.
    init_distributed(cfg.dist)
    run_dir = shared_run_dir(run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        log_platform(log)  # which platform, and a warning when an installed CUDA/TPU build went unused

    # --- Checks: everything a config can get wrong fails here, before anything is compiled.
    apply_hf_model(cfg)  # trainer.init_from=hf:<folder>: its config.json decides the model's keys
    validate(cfg, jax.device_count(), jax.process_count(), jax.devices()[0].platform)
    resume_dir = checkpoint.find_run(t.resume, run_dir) if t.resume else None
    cost_before = cost.previous(resume_dir)  # read before this run's env.json may overwrite it (same run dir)
    if resume_dir:
        check_same_data(resume_dir, cfg)
    checkpoint.check_writable(run_dir)

    # --- Mesh: sharding is data (conf/mesh), the step below is the same for every mesh.
    mesh = make_mesh(cfg.mesh)
    enable_compile_cache(t.compile_cache)

    # --- Data: grain pipeline, each process reading only its rows of every global batch.
    dataset = data.load(d, cfg.seed)
    check_fits(cfg.model, dataset.spec, d)  # a user's file against the model: known only once it is read
    check_batches(dataset.splits, d)
    check_vocab(cfg.model, dataset.spec)
    data_fp = fingerprint(d, cfg.seed)  # what data this run sees; a continued run is warned when it changed
    if resume_dir or t.init_from:
        warn_if_changed(data_fp, resume_dir or t.init_from, "trainer.resume" if resume_dir else "trainer.init_from")
    train_iter = data.train_iterator(dataset.splits["train"], d.batch_size, cfg.seed, jax.process_index(),
                                     jax.process_count())

    # --- Model, optimizer state and step: the state is born sharded on the mesh.
    if t.init_from:  # fine-tuning a pruned run keeps its masks: this model carries them too
        inherit_prune(cfg, t.init_from)
    run = build(cfg, dataset.spec, mesh, t.steps)
    state = run.state
    # With LoRA only the adapters are nnx.Param (trained); the frozen weights count towards the model's size.
    n_trainable, n_params = lora.count(state.params, state.rest)
    per_device = bytes_per_device(state)
    # Speed accounting: tokens per example, and the training FLOPs per example behind MFU (when the family
    # declares them).
    family = family_of(cfg.model)
    tokens = dataset.spec.input_shape[0] if dataset.spec.task == "lm" else 0
    flops_example = float(family.flops_per_example(cfg.model, dataset.spec, n_params)) \
        if family.flops_per_example else 0.0
    peak, peak_source = peak_tflops(jax.devices()[0].device_kind, t.peak_tflops) if flops_example else (0.0, None)

    def put(batch: dict) -> dict:  # this process's rows → one global array per field
        if jax.process_count() == 1:  # the whole batch in one call: ~40% less host CPU than a call per field
            return jax.device_put(batch, run.batch_sharding)
        return {k: jax.make_array_from_process_local_data(run.batch_sharding, v) for k, v in batch.items()}

    # --- Fine-tuning: another run's weights (a resumed run has them in its own checkpoint already).
    if t.init_from and not resume_dir:
        if hf_folder(t.init_from) is None:
            t.init_from = os.path.abspath(t.init_from)  # recorded in config.yaml: where the weights came from
        state, from_step = load_pretrained(t.init_from, cfg, dataset.spec, state, mesh)
        log.info("initialised from %s (step %d); training %s of %s parameters (%.2f%%)", t.init_from, from_step,
                 f"{n_trainable:,}", f"{n_params:,}", 100 * n_trainable / n_params)

    # --- Resume: params, optimizer state, step, RNG streams and the data position, on this run's mesh and process
    # count whatever the saved run's were (the position is a global batch index, the same on every process).
    start = 0
    if resume_dir:
        state, start = checkpoint.restore(resume_dir, checkpoint.abstract_like(state, run.shardings), train_iter)
        log.info("resumed from %s at step %d", resume_dir, start)

    # --- Compile once, ahead of the loop (its time reported apart).
    first = next(train_iter)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        train_step = run.train_step.lower(state, put(first)).compile()
    compile_s = time.perf_counter() - t0
    eval_step = run.eval_step

    # --- Tracking: process 0 writes metrics.jsonl, wandb, env.json, the vocabulary.
    tracker = Tracker(run_dir, cfg.logger, asdict(cfg), enabled=is_main)
    env = environment({
        "resumed_from": resume_dir, "start_step": start, "init_from": t.init_from, "n_params": n_params,
        "n_trainable": n_trainable, "trainable_fraction": n_trainable / n_params, "compile_seconds": compile_s,
        "flops_per_example": flops_example, "flops_per_token": flops_example / tokens if tokens else None,
        "peak_tflops_per_device": peak, "peak_source": peak_source,
        "mesh": dict(mesh.shape), "bytes_per_device": per_device, "data": data_fp,
        "lora_base_bytes_per_device":  # the frozen kernels LoRA adapts (QLoRA: quantized)
            lora.base_bytes_per_device(state.params, state.rest) if cfg.lora.rank else None})
    tracker.write_env(env)

    def record_cost(preempted: bool) -> dict:  # device-hours and dollars, into metrics.jsonl and env.json
        rec = cost.run_cost(t, jax.devices()[0].device_kind, cost.billed_devices(jax.devices()),
                            time.perf_counter() - started, (step - start) * d.batch_size,
                            (step - start) * d.batch_size * tokens, cost_before, preempted)
        tracker.log(step, "cost", cost.metrics(rec))
        env["cost"] = rec
        tracker.write_json("env.json", env)
        return rec

    if is_main:
        data.save_meta(dataset, run_dir)
        # The resolved config beside the run, whether Hydra launched it or a notebook did (export reads it).
        OmegaConf.save(OmegaConf.structured(cfg), os.path.join(run_dir, "config.yaml"))
        trained = f" ({n_trainable:,} trained)" if n_trainable != n_params else ""
        log.info("%s: %s params%s, mesh %s, %.1f MB per device, step compiled in %.1f s", cfg.name, f"{n_params:,}",
                 trained, dict(mesh.shape), max(per_device.values()) / 2**20, compile_s)
    ckpt = checkpoint.Checkpointer(run_dir, t.max_to_keep)
    guard = NumericsGuard(t.on_nan, t.max_nan_skips, t.spike_factor, ckpt.directory)

    # --- Loop: no host sync per step; metrics stay on device until a log or checkpoint step fetches them.
    pending, batch, step = [], first, start
    last_saved = start if resume_dir else None
    bar = tqdm(total=t.steps, initial=start, disable=not (is_main and t.progress), dynamic_ncols=True, leave=False)
    tick, ticked_at, results = time.perf_counter(), start, {}
    preemption = PreemptionWatch()
    try:
        with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules), preemption:
            while step < t.steps:
                if t.profile and step == t.profile[0]:
                    jax.profiler.start_trace(os.path.join(run_dir, "profile"))
                state, metrics = train_step(state, put(batch))
                pending.append(metrics)
                step += 1
                if t.profile and step == min(t.profile[1], t.steps):
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                # SIGTERM (spot VM, SLURM, Kubernetes): finish this step, save, stop. With several processes the
                # decision is taken together at log steps, so that every process saves the same step.
                preempted = preemption.agreed(at_sync_point=step % t.log_every == 0)
                save_now = step == t.steps or (t.ckpt_every and step % t.ckpt_every == 0) or preempted
                if step % t.log_every == 0 or save_now:
                    # Fetch and check before any save, so that no NaN state is ever checkpointed: NaN/Inf stops
                    # the run (trainer.on_nan=stop) or was skipped on the device and is counted here (skip).
                    host = jax.device_get(pending)
                    good = guard.check(host, step, last_saved)
                    elapsed = time.perf_counter() - tick
                    mean = {k: float(np.mean([m[k] for m in good or host])) for k in host[0]}
                    if t.on_nan == "skip":
                        mean["nan_skips"] = guard.skipped
                    if (ref := guard.spike(mean["loss"])) is not None:
                        log.warning("loss spike at step %d: %.4g, %.1fx the running mean %.4g", step, mean["loss"],
                                    mean["loss"] / ref, ref)
                        tracker.log(step, "loss_spike", {"loss": mean["loss"], "running_mean": ref})
                    mean.update(step_time_ms=1e3 * elapsed / (step - ticked_at),
                                examples_per_s=d.batch_size * (step - ticked_at) / elapsed)
                    if tokens:
                        mean["tokens_per_s"] = mean["examples_per_s"] * tokens
                    if flops_example:
                        mean["mfu"] = mean["examples_per_s"] * flops_example / (peak * 1e12 * mesh.size)
                    tracker.log(step, "train", mean)
                    bar.set_postfix(loss=f"{mean['loss']:.4f}", ex_s=f"{mean['examples_per_s']:.0f}")
                    bar.update(step - bar.n)
                    pending, tick, ticked_at, results["train"] = [], time.perf_counter(), step, mean
                if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                    t_eval = time.perf_counter()
                    tracker.log(step, "val", evaluate(eval_step, state, dataset.splits["val"], cfg, put))
                    tick += time.perf_counter() - t_eval  # evaluation time is not step time
                if save_now:
                    ckpt.save(step, state, train_iter)
                    last_saved = step
                if preempted:  # the finally below waits for the save to be complete on disk
                    raise Preempted(f"stopped by SIGTERM after step {step}, saved in {ckpt.directory}; continue with "
                                    f"trainer.resume=auto (or trainer.resume={run_dir})")
                if step < t.steps:
                    batch = next(train_iter)
    except BaseException as e:
        if isinstance(e, Preempted):  # a spot VM's run: what it cost so far, for the run that resumes it
            record_cost(preempted=True)
        tracker.close(ok=False)
        raise
    finally:
        bar.close()
        ckpt.close()  # waits for the asynchronous writes: a run never ends with a half-written checkpoint

    # --- Final evaluation on every held-out split, and a sample for language models.
    with jax.set_mesh(mesh), activation_sharding(mesh, cfg.mesh.act_rules):
        for split in ("val", "test"):
            if split in dataset.splits:
                results[split] = evaluate(eval_step, state, dataset.splits[split], cfg, put)
                tracker.log(step, split, results[split])
        if dataset.spec.task == "lm" and t.sample_chars and dataset.tokenizer is not None:
            results["sample"] = draw_sample(run.eval_def, state, dataset, cfg)
    results["cost"] = record_cost(preempted=False)
    tracker.close()
    results["compile_seconds"] = compile_s
    results["run_dir"] = run_dir
    return results


class PreemptionWatch:
    """Turns SIGTERM into a flag that the loop checks between steps (a handler must not touch JAX itself)."""

    def __init__(self):
        self.flag, self.previous = False, None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def agreed(self, at_sync_point: bool) -> bool:
        if jax.process_count() == 1:
            return self.flag
        if not at_sync_point:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self.flag))))


# The end-of-run sample's sampler: without the KV cache every token recomputes a window of up to block_size tokens,
# but one small graph compiles instead of the cached sampler's three (prefill, refill, decode). Measured on CPU
# (shakespeare_char, 200 tokens, block 64): 1.1 s against 2.1 s, nearly all of it compiling. Above this many window
# tokens (sample length x block) the cache wins.
UNCACHED_SAMPLE_TOKENS = 100_000


def draw_sample(eval_def, state, dataset, cfg: Config) -> str:
    """trainer.sample_chars tokens continuing a newline (mlsys.generate; the KV cache unless the sample is short)."""
    tok = dataset.tokenizer  # the run's own (saved beside it): what the data was tokenized with
    prompt = tok.encode("\n").tolist() or [tok.specials.get("eos", tok.specials.get("bos", 0))]
    model = nnx.merge(eval_def, state.params, state.rest)
    block = family_of(cfg.model).max_len(cfg.model) or cfg.data.seq_len
    out = generate.generate(model, [prompt], cfg.trainer.sample_chars, key=jax.random.key(cfg.seed),
                            temperature=cfg.trainer.sample_temperature, top_k=cfg.trainer.sample_top_k,
                            eos_id=tok.specials.get("eos"), block_size=block,
                            cached=cfg.trainer.sample_chars * block > UNCACHED_SAMPLE_TOKENS)
    return tok.decode(out[0])
