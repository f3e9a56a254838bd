"""Semantic checks of a typed config, run before anything is compiled: what types cannot say (ranges, names,
combinations, the mesh against the devices, the objective against the data). Each message names the key, the
value and a fix."""

import math

from mlsys.data.corpus import check_lm_data
from mlsys.data.sources import CONFIGS as DATA_CONFIGS
from mlsys.errors import check, one_of
from mlsys.models import REGISTRY
from mlsys.models.common import DTYPES
from mlsys.models.prune import check as check_prune
from mlsys.optim import DECAYS, OPTIMIZERS
from mlsys.parallel import check_rules, data_parallel_size, resolve_shape

LOGGERS = ("wandb", "mlflow", "jsonl")


_check, _one_of = check, one_of
TASKS = {"lm": "language-modelling", "classify": "classification"}


def data_task(data) -> str:
    if data.name in ("text", "corpus"):
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
    _check(t.peak_tflops is None or t.peak_tflops > 0, "trainer.peak_tflops", t.peak_tflops,
           "must be > 0 TFLOP/s, e.g. trainer.peak_tflops=989 (or null: the built-in table)")
    _one_of("trainer.on_nan", t.on_nan, ("stop", "skip"))
    _check(t.max_nan_skips > 0, "trainer.max_nan_skips", t.max_nan_skips, "must be > 0, e.g. trainer.max_nan_skips=10")
    _check(t.spike_factor == 0 or t.spike_factor > 1, "trainer.spike_factor", t.spike_factor,
           "must be 0 (off) or > 1, e.g. trainer.spike_factor=3")
    _check(t.cost_per_device_hour is None or (math.isfinite(t.cost_per_device_hour) and t.cost_per_device_hour >= 0),
           "trainer.cost_per_device_hour", t.cost_per_device_hour,
           "must be a price >= 0 in USD per device-hour, e.g. trainer.cost_per_device_hour=2.5 (null = the table)")
    for kind, row in t.cost_table.items():
        _check(len(row) == 2 and all(math.isfinite(p) and p >= 0 for p in row), f"trainer.cost_table[{kind!r}]",
               row, "must be [on-demand, spot] prices >= 0 in USD per device-hour, e.g. [3.0, 1.5]")
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
    if d.name in ("text", "synthetic", "corpus"):
        _check(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    if d.name == "text":
        _one_of("data.level", d.level, ("char", "byte"))
    if d.name in ("text", "corpus"):  # tokenizer, packing, files: mlsys/data/corpus.py
        check_lm_data(d)
    if d.name == "synthetic":
        _one_of("data.task", d.task, ("lm", "classify"))
    if hasattr(d, "augment"):  # image sources (data=images, data=hf)
        check_images(d)
    for key in ("val_fraction", "test_fraction"):
        if hasattr(d, key):
            _check(0 <= getattr(d, key) < 1, f"data.{key}", getattr(d, key), "must be in [0, 1)")
    # model: the family checks its own keys; what every family shares is checked here
    family = REGISTRY.get(m.name)
    _check(family is not None and type(m) is family.config, "model.name", m.name,
           f"does not match the selected model group; select the model with model=NAME, NAME in {sorted(REGISTRY)}")
    task = data_task(d)
    if family.task is not None and family.task != task:
        fits = " or ".join(f"model={n}" for n, f in REGISTRY.items() if f.task == task)
        what = {"lm": "is a language model", "classify": "classifies"}.get(family.task, f"is a {family.task} model")
        _check(False, "model", m.name, f"{what}, but data={d.name} is a {TASKS.get(task, task)} task; use {fits}")
    for key in ("dtype", "param_dtype"):
        if hasattr(m, key):
            _one_of(f"model.{key}", getattr(m, key), DTYPES)
    if hasattr(m, "dropout"):
        _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    if family.check is not None:
        family.check(m, d, platform)
    # mesh: fits the devices, and the batch splits evenly across processes and data-parallel devices
    check_rules(cfg.mesh)
    shape = resolve_shape(cfg.mesh, n_devices)
    dp = data_parallel_size(shape, cfg.mesh.act_rules)
    tp = shape["tensor"]
    if tp > 1:  # tensor parallelism splits heads and hidden widths: they must divide evenly
        widths = family.tensor_widths(m) if family.tensor_widths else {}
        for key, values in widths.items():
            _check(all(v % tp == 0 for v in values), key, values[0] if len(values) == 1 else values,
                   f"must be divisible by the tensor-parallel size {tp}; change it or mesh.shape.tensor")
    for key, b in (("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size)):
        unit = math.lcm(dp, n_processes)
        _check(b % unit == 0, key, b,
               f"must be divisible by the data-parallel size {dp} (mesh {shape}) and the {n_processes} "
               f"process(es); e.g. {key}={unit * max(1, round(b / unit))}")
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
    check_prune(cfg.prune)
    _check(not (cfg.prune.sparsity and cfg.lora.rank), "lora.rank", cfg.lora.rank, "LoRA on a pruned model is not "
           "supported; fine-tune it without adapters (lora.rank=0)")
    lo = cfg.lora
    if lo.quantize_base is not None:
        _one_of("lora.quantize_base", lo.quantize_base, ("int8", "nf4"))
        _check(lo.rank > 0, "lora.quantize_base", lo.quantize_base, "quantizes the frozen weights that LoRA adapts, "
               "but lora.rank=0 (no adapters); set lora.rank (e.g. 8) or drop lora.quantize_base")
    _check(lo.rank >= 0, "lora.rank", lo.rank, "must be >= 0 (0 = no adapters)")
    _check(lo.alpha > 0, "lora.alpha", lo.alpha, "must be > 0 (the update is scaled by alpha / rank)")
    _check(len(lo.targets) > 0, "lora.targets", lo.targets, 'must name at least one layer pattern, e.g. ["*"]')
    _check(lo.rank == 0 or t.init_from is not None, "lora.rank", lo.rank,
           "adapts a trained model: set trainer.init_from=<run dir> (a run of the same model)")
    # the objective a run returns (to a sweeper): a metric this run will log
    check_objective(cfg.sweep, d)


def check_images(d) -> None:
    from mlsys.data.hf import FORMATS
    from mlsys.data.images import AUGMENTS

    _check(d.image_size >= 0, "data.image_size", d.image_size, "must be >= 0 (0 = as stored), e.g. 32")
    for a in d.augment:
        _one_of("data.augment", a, AUGMENTS)
    _check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale",
           d.crop_scale, "must be [min, max] area fractions with 0 < min <= max <= 1, e.g. [0.25,1.0]")
    if d.name == "hf":
        _one_of("data.format", d.format, FORMATS)


SPLIT_METRICS = {"val": ("loss", "accuracy", "bits_per_byte"), "test": ("loss", "accuracy", "bits_per_byte"),
                 "train": ("loss", "accuracy", "bits_per_byte", "grad_norm", "lr", "step_time_ms", "examples_per_s",
                           "tokens_per_s", "mfu")}


def check_objective(s, d) -> None:
    split, _, metric = s.objective.partition(".")
    _check(metric in SPLIT_METRICS.get(split, ()), "sweep.objective", s.objective,
           f"must be <split>.<metric>, one of {[f'{k}.{m}' for k, ms in SPLIT_METRICS.items() for m in ms]}")
    has = {"train": True, "val": getattr(d, "val_fraction", 1) > 0, "test": getattr(d, "test_fraction", 0) > 0}
    _check(has[split], "sweep.objective", s.objective, f"data={d.name} has no {split} split here; use "
           f"{'val' if has['val'] else 'train'}.{metric}")
    _one_of("sweep.mode", s.mode, ("min", "max", "last"))
    _check(s.trials > 0, "sweep.trials", s.trials, "must be > 0")
