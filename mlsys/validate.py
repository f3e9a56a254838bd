"""Semantic checks of a typed config, run before anything is compiled: what types cannot say (ranges, names,
combinations, the mesh against the devices, the objective against the data). Each message names the key, the
value and a fix."""

import math

from mlsys.data.sources import CONFIGS as DATA_CONFIGS
from mlsys.errors import ConfigError
from mlsys.models import REGISTRY
from mlsys.models.cnn import NORMS, POOLS
from mlsys.models.common import ACTIVATIONS, DTYPES
from mlsys.models.gpt import ATTENTION, POS_EMBS, REMAT
from mlsys.optim import DECAYS, OPTIMIZERS
from mlsys.parallel import check_rules, data_parallel_size, resolve_shape

LOGGERS = ("wandb", "mlflow", "jsonl")


def _check(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")


def _one_of(key: str, value, options) -> None:
    _check(value in options, key, value, f"must be one of {list(options)}")


def data_task(data) -> str:
    if data.name == "text":
        return "lm"
    if data.name == "synthetic":
        return data.task
    return "classify"


def validate(cfg, n_devices: int, n_processes: int = 1, platform: str = "cpu") -> None:
    """Semantic checks that need no compilation. Raises ConfigError naming the key, the value and a fix."""
    t, o, m, d = cfg.trainer, cfg.optim, cfg.model, cfg.data
    # trainer
    _check(bool(cfg.name) and "/" not in cfg.name, "name", cfg.name, "must be a non-empty name without '/' (runs "
           "go to runs/<name>/)")
    _check(cfg.seed >= 0, "seed", cfg.seed, "must be >= 0")
    _check(t.steps > 0, "trainer.steps", t.steps, "must be > 0, e.g. trainer.steps=1000")
    _check(t.log_every > 0, "trainer.log_every", t.log_every, "must be > 0, e.g. trainer.log_every=50")
    _check(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "must be >= 0 (0 = at the end only)")
    _check(t.ckpt_every >= 0, "trainer.ckpt_every", t.ckpt_every, "must be >= 0 (0 = at the end only)")
    _check(t.max_to_keep > 0, "trainer.max_to_keep", t.max_to_keep, "must be > 0")
    _check(t.sample_chars >= 0, "trainer.sample_chars", t.sample_chars, "must be >= 0")
    _check(t.sample_temperature > 0, "trainer.sample_temperature", t.sample_temperature, "must be > 0")
    _one_of("trainer.step", t.step, ("jit", "shard_map"))
    _check(t.grad_accum > 0, "trainer.grad_accum", t.grad_accum, "must be > 0 (1 = no accumulation)")
    _check(len(t.profile) in (0, 2) and (not t.profile or 0 <= t.profile[0] < t.profile[1]), "trainer.profile",
           t.profile, "must be [] or [start, stop] with 0 <= start < stop, e.g. trainer.profile=[10,20]")
    _check(t.peak_tflops >= 0, "trainer.peak_tflops", t.peak_tflops, "must be >= 0 (0 = the built-in table)")
    _one_of("trainer.on_nan", t.on_nan, ("stop", "skip"))
    _check(t.max_nan_skips > 0, "trainer.max_nan_skips", t.max_nan_skips, "must be > 0, e.g. trainer.max_nan_skips=10")
    _check(t.spike_factor == 0 or t.spike_factor > 1, "trainer.spike_factor", t.spike_factor,
           "must be 0 (off) or > 1, e.g. trainer.spike_factor=3")
    # optimizer
    _one_of("optim.name", o.name, OPTIMIZERS)
    _one_of("optim.decay", o.decay, DECAYS)
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0, e.g. optim.lr=1e-3")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.decay_steps >= 0, "optim.decay_steps", o.decay_steps, "must be >= 0 (0 = trainer.steps)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 = no clipping)")
    _check(0 < o.b1 < 1 and 0 < o.b2 < 1, "optim.b1/b2", (o.b1, o.b2), "must be in (0, 1)")
    _check(math.isfinite(o.lr), "optim.lr", o.lr, "must be finite, e.g. optim.lr=1e-3")
    _check(o.eps > 0, "optim.eps", o.eps, "must be > 0, e.g. optim.eps=1e-8")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    # data
    _one_of("data.name", d.name, DATA_CONFIGS)
    _check(type(d) is DATA_CONFIGS[d.name], "data.name", d.name,
           f"does not match the selected data group; select the source with data={d.name}")
    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "must be > 0")
    _check(d.eval_batch_size >= 0, "data.eval_batch_size", d.eval_batch_size, "must be >= 0 (0 = data.batch_size)")
    _check(d.eval_batches >= 0, "data.eval_batches", d.eval_batches, "must be >= 0 (0 = the whole split)")
    _check(getattr(d, "split_seed", 0) >= 0, "data.split_seed", getattr(d, "split_seed", 0), "must be >= 0")
    if d.name in ("text", "synthetic"):
        _check(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    if d.name == "text":
        _one_of("data.level", d.level, ("char", "byte"))
    if d.name == "synthetic":
        _one_of("data.task", d.task, ("lm", "classify"))
    for key in ("val_fraction", "test_fraction"):
        if hasattr(d, key):
            _check(0 <= getattr(d, key) < 1, f"data.{key}", getattr(d, key), "must be in [0, 1)")
    # model
    _check(type(m) is REGISTRY.get(m.name, (None,))[0], "model.name", m.name,
           f"does not match the selected model group; select the model with model=NAME, NAME in {sorted(REGISTRY)}")
    task = data_task(d)
    if m.name in ("mlp", "cnn"):
        _check(task == "classify", "model", m.name, f"classifies, but data={d.name} is a language-modelling "
               f"task; use model=gpt")
    if m.name == "gpt":
        _check(task == "lm", "model", m.name, f"is a language model, but data={d.name} is a classification task; "
               f"use model=mlp or model=cnn")
    if m.name != "custom":
        _one_of("model.dtype", m.dtype, DTYPES)
        _one_of("model.param_dtype", m.param_dtype, DTYPES)
        _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    if m.name == "mlp":
        _one_of("model.activation", m.activation, ACTIVATIONS)
        _check(all(h > 0 for h in m.hidden), "model.hidden", m.hidden, "every width must be > 0")
    if m.name == "cnn":
        _one_of("model.norm", m.norm, NORMS)
        _one_of("model.pool", m.pool, POOLS)
        _check(len(m.channels) > 0 and all(c > 0 for c in m.channels), "model.channels", m.channels,
               "must be a non-empty list of positive widths")
        _check(d.name == "digits" or len(getattr(d, "input_shape", [0, 0, 0])) == 3, "model", "cnn",
               "needs image inputs (H, W, C)")
    if m.name == "gpt":
        _one_of("model.pos_emb", m.pos_emb, POS_EMBS)
        _check(m.n_layer > 0 and m.n_head > 0, "model.n_layer/n_head", (m.n_layer, m.n_head), "must be > 0")
        _check(m.d_model % m.n_head == 0, "model.d_model", m.d_model,
               f"must be divisible by model.n_head={m.n_head}")
        _check(m.pos_emb != "rope" or (m.d_model // m.n_head) % 2 == 0, "model.pos_emb", m.pos_emb,
               f"rope needs an even head size, d_model/n_head = {m.d_model // m.n_head}")
        _check(d.seq_len <= m.block_size, "data.seq_len", d.seq_len,
               f"is above the model's maximum model.block_size={m.block_size}; lower data.seq_len or raise "
               f"model.block_size")
        _check(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "must be >= 0 (0 = the data's vocabulary)")
        _one_of("model.attention", m.attention, ATTENTION)
        _one_of("model.remat", m.remat, REMAT)
        _check(m.vocab_multiple > 0, "model.vocab_multiple", m.vocab_multiple, "must be > 0 (1 = no padding)")
        _check(m.d_model > 0 and m.d_ff >= 0, "model.d_model/d_ff", (m.d_model, m.d_ff),
               "need d_model > 0 and d_ff >= 0 (0 = 4 x d_model)")
        _check(m.attention != "cudnn" or platform == "gpu", "model.attention", m.attention,
               f"needs an NVIDIA GPU, but the devices are {platform}; use model.attention=auto or xla")
    if m.name == "custom":
        _check(m.target not in ("", "???"), "model.target", m.target, "name your class, e.g. "
               "model.target=my_pkg.nets:TinyNet")
    # mesh: fits the devices, and the batch splits evenly across processes and data-parallel devices
    check_rules(cfg.mesh)
    shape = resolve_shape(cfg.mesh, n_devices)
    dp = data_parallel_size(shape, cfg.mesh.act_rules)
    tp = shape["tensor"]
    if tp > 1:  # tensor parallelism splits heads and hidden widths: they must divide evenly
        widths = {"mlp": ("model.hidden", m.hidden)} if m.name == "mlp" else {}
        if m.name == "gpt":
            widths = {"heads": ("model.n_head", [m.n_head]), "mlp": ("model.d_ff", [m.d_ff or 4 * m.d_model])}
        if m.name == "cnn":
            widths = {"mlp": ("model.channels/hidden", [*m.channels, m.hidden])}
        for key, values in widths.values():
            _check(all(v % tp == 0 for v in values), key, values[0] if len(values) == 1 else values,
                   f"must be divisible by the tensor-parallel size {tp}; change it or mesh.shape.tensor")
    for key, b in (("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size)):
        _check(b % dp == 0 and b % n_processes == 0, key, b,
               f"must be divisible by the data-parallel size {dp} (mesh {shape}) and the {n_processes} "
               f"process(es); e.g. {key}={max(dp, n_processes) * max(1, b // max(dp, n_processes))}")
    k = t.grad_accum
    _check(d.batch_size % (k * dp) == 0, "data.batch_size", d.batch_size,
           f"must be divisible by trainer.grad_accum={k} x the data-parallel size {dp} = {k * dp}")
    dist = cfg.dist
    _check(dist.num_processes >= 1 and 0 <= dist.process_id < dist.num_processes, "dist.process_id/num_processes",
           (dist.process_id, dist.num_processes), "need num_processes >= 1 and 0 <= process_id < num_processes")
    _check(dist.timeout_s > 0, "dist.timeout_s", dist.timeout_s, "must be > 0 (seconds)")
    # logger
    _one_of("logger.name", cfg.logger.name, LOGGERS)
    # fine-tuning
    lo = cfg.lora
    _check(lo.rank >= 0, "lora.rank", lo.rank, "must be >= 0 (0 = no adapters)")
    _check(lo.alpha > 0, "lora.alpha", lo.alpha, "must be > 0 (the update is scaled by alpha / rank)")
    _check(len(lo.targets) > 0, "lora.targets", lo.targets, 'must name at least one layer pattern, e.g. ["*"]')
    _check(lo.rank == 0 or t.init_from is not None, "lora.rank", lo.rank,
           "adapts a trained model: set trainer.init_from=<run dir> (a run of the same model)")
    # the objective a run returns (to a sweeper): a metric this run will log
    check_objective(cfg.sweep, d)


SPLIT_METRICS = {"val": ("loss", "accuracy", "bits_per_byte"), "test": ("loss", "accuracy", "bits_per_byte"),
                 "train": ("loss", "accuracy", "bits_per_byte", "grad_norm", "lr", "step_time_ms", "examples_per_s", "tokens_per_s",
                           "mfu")}


def check_objective(s, d) -> None:
    split, _, metric = s.objective.partition(".")
    _check(metric in SPLIT_METRICS.get(split, ()), "sweep.objective", s.objective,
           f"must be <split>.<metric>, one of {[f'{k}.{m}' for k, ms in SPLIT_METRICS.items() for m in ms]}")
    has = {"train": True, "val": getattr(d, "val_fraction", 1) > 0, "test": getattr(d, "test_fraction", 0) > 0}
    _check(has[split], "sweep.objective", s.objective, f"data={d.name} has no {split} split here; use "
           f"{'val' if has['val'] else 'train'}.{metric}")
    _one_of("sweep.mode", s.mode, ("min", "max", "last"))
    _check(s.trials > 0, "sweep.trials", s.trials, "must be > 0")
