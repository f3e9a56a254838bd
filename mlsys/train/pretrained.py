"""trainer.init_from: start a run from another run's trained weights (fine-tuning, with or without LoRA).

The weights are matched by path (blocks.0.attn.qkv.kernel, ...). LoRA keeps the pretrained weights under their
old paths, so a plain run's checkpoint initialises an adapted model; the adapters keep their own initialisation
(B = 0: the run starts exactly at the pretrained function). The optimizer state and the step start afresh.
"""

import os
from dataclasses import asdict, replace

import jax
from flax import nnx

from mlsys import checkpoint
from mlsys.config import Config, load_saved
from mlsys.errors import CheckpointError, ConfigError
from mlsys.models.lora import Frozen
from mlsys.models.prune import PruneMask
from mlsys.models.quant import quantize
from mlsys.train.state import abstract_model

# What a pretrained run provides: its weights, batch statistics and pruning masks (not RNG streams, not LoRA
# adapters).
WEIGHTS = (nnx.Param, Frozen, nnx.BatchStat, PruneMask)


def _weights(state: nnx.State) -> dict:
    return {path: v for path, v in nnx.to_flat_state(state)
            if isinstance(v, WEIGHTS) and not isinstance(v, nnx.LoRAParam)}


def _path(p: tuple) -> str:
    return ".".join(map(str, p))


QUANTIZED = ("kernel_codes", "kernel_scale")  # QLoRA's stored form of a pretrained "kernel"


def _as_trained(weights: dict) -> dict:
    """Our weights by the paths a plain run saved them under: QLoRA's codes and scales stand for the kernel (its
    shape is checked when it is quantized)."""
    out = {}
    for p, v in weights.items():
        if p[-1] in QUANTIZED:
            out[(*p[:-1], "kernel")] = None
        else:
            out[p] = v
    return out


def check_compatible(run_dir: str, base: Config, cfg: Config, spec) -> None:
    """Every weight of this model must exist in the pretrained one with the same shape (and nothing extra there)."""
    key = f"trainer.init_from={run_dir!r}"
    if base.model.name != cfg.model.name:
        raise ConfigError(f"{key}: that run trained model={base.model.name}, this one is model={cfg.model.name}; "
                          f"fine-tune with the same model")
    ours = _as_trained(_weights(nnx.state(abstract_model(cfg.model, spec, cfg.seed, cfg.lora, cfg.prune))))
    theirs = _weights(nnx.state(abstract_model(base.model, spec, base.seed, prune=base.prune)))
    problems = [f"{_path(p)}: missing there" for p in ours if p not in theirs]
    problems += [f"{_path(p)}: not in this model" for p in theirs if p not in ours]
    problems += [f"{_path(p)}: shape {tuple(theirs[p].shape)} there, {tuple(v.shape)} here"
                 for p, v in ours.items() if v is not None and p in theirs and theirs[p].shape != v.shape]
    if problems:
        a, b = asdict(base.model), asdict(cfg.model)
        differ = [f"model.{k}={a[k]!r} there, {b[k]!r} here" for k in a if a[k] != b.get(k)]
        raise ConfigError(f"{key}: its model does not match this one ({'; '.join(problems[:4])}"
                          f"{f'; and {len(problems) - 4} more' if len(problems) > 4 else ''}). "
                          f"{'Differences: ' + '; '.join(differ) + '. ' if differ else ''}"
                          f"Use that run's model config (in {os.path.join(run_dir, 'config.yaml')}).")


def inherit_prune(cfg: Config, run_dir: str) -> None:
    """A run that starts from a pruned run (experiments.prune) takes its prune settings, so that it carries the
    masks and holds the pruned weights at zero. Nothing happens when `run_dir` is not a readable run (load_pretrained
    reports that)."""
    try:
        base = load_saved(run_dir)
    except (CheckpointError, ConfigError):
        return
    if base.prune.sparsity and not cfg.prune.sparsity:
        cfg.prune = base.prune


HF = "hf:"  # trainer.init_from=hf:<folder>: a Hugging Face model folder (mlsys/hf)


def hf_folder(init_from: str | None) -> str | None:
    """The Hugging Face folder trainer.init_from names (hf:<folder>), else None."""
    return init_from[len(HF):] if init_from and init_from.startswith(HF) else None


# data.tokenizer left at its default: a text source would tokenize with its own vocabulary, whose ids mean nothing
# to an imported model's embedding rows.
TOKENIZER_DEFAULTS = {"text": "", "corpus": "bpe"}


def apply_hf_model(cfg: Config) -> None:
    """trainer.init_from=hf:<folder>: the folder's config.json decides the model keys it maps (the user's model
    overrides must agree with it); its tokenizer.json becomes data.tokenizer unless one was chosen; the folder is
    recorded by its absolute path."""
    from mlsys.hf.config import apply, read_config

    folder = hf_folder(cfg.trainer.init_from)
    if folder is None:
        return
    folder = os.path.abspath(folder)
    cfg.trainer.init_from = HF + folder
    cfg.model = apply(cfg.model, read_config(folder), os.path.join(folder, "config.json"))
    d, tokenizer = cfg.data, os.path.join(folder, "tokenizer.json")
    if TOKENIZER_DEFAULTS.get(d.name, None) == getattr(d, "tokenizer", None) and os.path.isfile(tokenizer):
        d.tokenizer = tokenizer


def load_pretrained(run_dir: str, cfg: Config, spec, state, mesh):
    """`state` (this run's fresh TrainState) with its weights replaced by `run_dir`'s latest checkpoint (or, for
    hf:<folder>, by a Hugging Face model's weights)."""
    from mlsys.train.build import restore_model  # build imports this module's neighbours; import late

    if hf_folder(run_dir) is not None:
        return load_hf(hf_folder(run_dir), cfg, spec, state), 0
    try:
        base = load_saved(run_dir)
    except CheckpointError as e:
        raise CheckpointError(f"trainer.init_from: {e}") from None
    if not checkpoint.has_checkpoint(run_dir):
        raise ConfigError(f"trainer.init_from={run_dir!r}: that run has no checkpoint to start from")
    if base.lora.rank:
        raise ConfigError(f"trainer.init_from={run_dir!r} is itself a LoRA fine-tune (lora.rank={base.lora.rank}); "
                          f"start from the run it fine-tuned ({base.trainer.init_from})")
    check_compatible(run_dir, base, cfg, spec)
    # The pretrained run's weights only, placed on this run's mesh (whatever mesh and process count saved them).
    _, params, rest, step = restore_model(run_dir, replace(base, mesh=cfg.mesh), spec, mesh)
    found = _weights(params) | _weights(rest)

    quantized = {}  # QLoRA: each pretrained kernel quantized once, as it arrives

    def value(p, v):
        if p[-1] in QUANTIZED:
            kernel = (*p[:-1], "kernel")
            if kernel not in quantized:
                quantized[kernel] = quantize(found[kernel].get_value(), cfg.lora.quantize_base)
            return v.replace(quantized[kernel][QUANTIZED.index(p[-1])])
        if p in found and isinstance(v, WEIGHTS) and not isinstance(v, nnx.LoRAParam):
            return v.replace(found[p].get_value())
        return v

    def take(st: nnx.State) -> nnx.State:
        return nnx.from_flat_state([(p, value(p, v)) for p, v in nnx.to_flat_state(st)])

    loaded = state.replace(params=take(state.params), rest=take(state.rest))
    loaded = jax.device_put(loaded, jax.tree.map(lambda x: x.sharding, state))
    return loaded, step


def load_hf(folder: str, cfg: Config, spec, state):
    """`state` with its weights streamed from a Hugging Face folder, each parameter born in the sharding the fresh
    one had (whose buffer is freed at once: never two copies of the model). LoRA adapters keep their
    initialisation; QLoRA quantizes each kernel as it arrives. The model config was set from config.json before
    the state was built (mlsys.hf.config.apply, in the loop)."""
    from mlsys.hf.load import HFSource

    key = f"trainer.init_from={HF}{folder}"
    quantized = {}
    with HFSource(folder, cfg.model, cfg.model.vocab_size or spec.num_classes) as src:
        ours = {p for p in _as_trained(_weights(nnx.state(abstract_model(cfg.model, spec, cfg.seed, cfg.lora,
                                                                          cfg.prune))))}
        missing = [_path(p) for p in src.entries if p not in ours]
        if missing:
            raise ConfigError(f"{key}: this model has no parameter {', '.join(missing[:4])}; leave the model keys "
                              f"to config.json")

        def value(p, v):
            if p[-1] in QUANTIZED:
                kernel = (*p[:-1], "kernel")
                if kernel not in quantized:
                    codes = v.get_value()
                    full = src.array(kernel, jax.sharding.NamedSharding(codes.sharding.mesh, codes.sharding.spec),
                                     "float32")
                    quantized[kernel] = quantize(full, cfg.lora.quantize_base)
                    full.delete()
                return _swap(v, quantized[kernel][QUANTIZED.index(p[-1])])
            if p in src.entries and isinstance(v, WEIGHTS) and not isinstance(v, nnx.LoRAParam):
                old = v.get_value()
                return _swap(v, src.array(p, old.sharding, old.dtype))
            return v

        def take(st: nnx.State) -> nnx.State:
            return nnx.from_flat_state([(p, value(p, v)) for p, v in nnx.to_flat_state(st)])

        return state.replace(params=take(state.params), rest=take(state.rest))


def _swap(v, new):
    """v holding `new`; v's old buffer is deleted now rather than whenever the last reference goes."""
    old = v.get_value()
    out = v.replace(jax.device_put(new, old.sharding) if new.sharding != old.sharding else new)
    old.delete()
    return out
