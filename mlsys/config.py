"""Typed configs. Every Hydra group has a dataclass schema in the ConfigStore, so an unknown key or a wrong type
fails when Hydra composes the config; `validate` (mlsys/validate.py) then checks what types cannot before anything
is compiled. Also: reading a run's saved config back (`load_saved`)."""

import secrets
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mlsys.cost import DEFAULT_TABLE as COST_TABLE
from mlsys.data.sources import CONFIGS as DATA_CONFIGS
from mlsys.errors import CheckpointError, ConfigError
from mlsys.models import REGISTRY
from mlsys.models.lora import LoRAConfig
from mlsys.models.prune import PruneConfig
from mlsys.optim import OptimConfig
from mlsys.parallel import MeshConfig
from mlsys.sweep import register_resolvers

@dataclass
class TrainerConfig:
    steps: int = 1000
    log_every: int = 50  # steps between metric fetches (the only host syncs in the loop)
    eval_every: int = 0  # 0 = evaluate at the end only
    ckpt_every: int = 0  # 0 = checkpoint at the end only
    max_to_keep: int = 3
    resume: Optional[str] = None  # a run dir, or "auto" (the latest run of this experiment with a checkpoint)
    sample_chars: int = 200  # language models: characters sampled and printed at the end
    sample_temperature: float = 0.8
    sample_top_k: int = 0  # 0 = the whole vocabulary
    progress: bool = True  # a progress bar on stderr
    step: str = "jit"  # "jit" (GSPMD places the collectives) or "shard_map" (explicit collectives, same numbers)
    grad_accum: int = 1  # micro-batches per step (lax.scan); data.batch_size stays the batch of one step
    profile: list[int] = field(default_factory=list)  # [start, stop]: a jax.profiler trace of those steps
    # A persistent compilation cache shared by runs (e.g. "~/.cache/mlsys/jax"); "" = off. Off by default: with
    # jaxlib 0.10.2 on CPU, some executables loaded back from it (scanned llama steps on 8 devices) abort the process.
    compile_cache: str = ""
    peak_tflops: Optional[float] = None  # the device's peak for MFU; None = the table in mlsys/perf.py (measured on CPU)
    on_nan: str = "stop"  # NaN/Inf loss or gradient: "stop" (error naming the step) or "skip" (no update, counted)
    max_nan_skips: int = 10  # on_nan=skip: stop after this many skipped steps in a row
    spike_factor: float = 3.0  # log a loss_spike when a log step's loss exceeds this x the running mean; 0 = off
    init_from: Optional[str] = None  # a run dir whose latest checkpoint's weights start this run (fine-tuning)
    # Cost (mlsys/cost.py): USD per device-hour; None = trainer.cost_table's price for the device kind
    cost_per_device_hour: Optional[float] = None
    spot: bool = False  # price from the table's spot column (preemptible VMs) instead of on-demand
    cost_table: dict[str, list[float]] = field(default_factory=lambda: dict(COST_TABLE))  # kind: [on-demand, spot]


@dataclass
class DistConfig:
    """Several processes (hosts). Under SLURM, or a Kubernetes indexed Job that sets MLSYS_COORDINATOR and
    MLSYS_NUM_PROCESSES, this is detected from the environment; set it by hand to launch processes yourself."""

    num_processes: int = 1
    process_id: int = 0
    coordinator: Optional[str] = None  # "host:port" of process 0
    timeout_s: int = 120  # how long every process waits for the others to join


@dataclass
class LoggerConfig:
    name: str = "wandb"  # one of mlsys.validate.LOGGERS; metrics.jsonl is written either way
    project: str = "mlsys"
    entity: Optional[str] = None
    mode: Optional[str] = None  # wandb: None = offline, unless WANDB_MODE or WANDB_API_KEY is set
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None  # wandb group / MLflow parent run; a sweep's runs are grouped by the sweep dir
    store_dir: Optional[str] = None  # MLflow's local store goes in <store_dir>/mlruns (None = the run dir; a
    # sweep's runs share the sweep dir's); MLFLOW_TRACKING_URI, when set, names a server or store instead


@dataclass
class SweepConfig:
    """What a sweep optimises. Every run returns its objective to Hydra (a sweeper's score), whether or not it
    is part of a sweep; conf/sweep/*.yaml set these with the search space."""

    objective: str = "val.loss"  # "<split>.<metric>" from metrics.jsonl, e.g. val.accuracy
    mode: str = "min"  # over every value the run logged: min, max, or last
    trials: int = 20  # an Optuna sweep's total budget; rerunning the sweep runs only the trials it still lacks


@dataclass
class Config:
    name: str = "default"  # experiment name: runs go to runs/<name>/
    seed: int = 0
    model: Any = MISSING  # typed by the chosen model's own schema (mlsys.models)
    data: Any = MISSING  # typed by the chosen source's own schema (mlsys.data.sources)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # low-rank adapters (fine-tuning with trainer.init_from)
    prune: PruneConfig = field(default_factory=PruneConfig)  # set by experiments.prune; inherited by init_from


_STORED: dict = {}  # (group, name) -> (the ConfigStore, the schema stored there)


def register() -> None:
    """Put every schema in Hydra's ConfigStore; conf/<group>/<option>.yaml files extend `<option>_schema`.

    Called before every compose, but each schema is stored once per process: storing converts the dataclass to an
    OmegaConf node (~30 ms for all of them). A family or data source registered since the last call (a plugin, a
    test) is stored then, and all of them again if the ConfigStore was replaced. (Hydra deep-copies what it loads
    from the store, so a stored node is never changed by a compose.)"""
    cs = ConfigStore.instance()
    schemas = [(None, "base_config", Config),
               *(("model", f"{name}_schema", family.config) for name, family in REGISTRY.items()),
               *(("data", f"{name}_schema", schema) for name, schema in DATA_CONFIGS.items()),
               ("optim", "optim_schema", OptimConfig), ("mesh", "mesh_schema", MeshConfig),
               ("trainer", "trainer_schema", TrainerConfig), ("logger", "logger_schema", LoggerConfig)]
    for group, name, node in schemas:
        if _STORED.get((group, name)) != (cs, node):  # both compared by identity
            cs.store(group=group, name=name, node=node)
            _STORED[(group, name)] = (cs, node)
    register_resolvers()
    if not OmegaConf.has_resolver("mlsys.uid"):
        # A run dir suffix unique even for two runs started in the same second. Hydra reads run.dir once.
        OmegaConf.register_new_resolver("mlsys.uid", lambda: secrets.token_hex(3), use_cache=True)


def _reject_unknown_keys(node, path: str = "") -> None:
    """`+group.key=value` adds keys that the schema lacks (Hydra forces the add), and OmegaConf.to_object would
    drop them silently: a typo must not be ignored."""
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in node.keys():
        if known is not None and key not in known:
            raise ConfigError(f"{path}{key}: no such key in {schema.__name__}; the keys are {sorted(known)}")
        if OmegaConf.is_dict(node._get_node(key)):
            _reject_unknown_keys(node[key], f"{path}{key}.")


def to_typed(cfg: DictConfig) -> Config:
    """The composed DictConfig as typed dataclass objects (lists and dicts as plain Python)."""
    _reject_unknown_keys(cfg)
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed.model, tuple(f.config for f in REGISTRY.values())):
        raise ConfigError(f"model={typed.model!r} is not a known model config; select one with model=NAME, "
                          f"NAME in {sorted(REGISTRY)}")
    return typed


def load_saved(run_dir: str) -> Config:
    """The typed config a run was trained with (config.yaml, written by the loop; else Hydra's copy)."""
    import os

    path = next((p for p in (os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, ".hydra", "config.yaml"))
                 if os.path.isfile(p)), None)
    if path is None:
        raise CheckpointError(f"{run_dir!r}: not a run dir (no config.yaml); give runs/<exp>/<time>")
    register()
    try:
        raw = OmegaConf.load(path)
        schema = OmegaConf.structured(Config)
        schema.model = OmegaConf.structured(REGISTRY[raw.model.name].config)
        schema.data = OmegaConf.structured(DATA_CONFIGS[raw.data.name])
        cfg = OmegaConf.to_object(OmegaConf.merge(schema, raw))
    except Exception as e:
        raise ConfigError(f"{path}: cannot read the run's config ({str(e).splitlines()[0]})") from None
    # A run dir moved or copied elsewhere (an imported Hugging Face model names its tokenizer by absolute path):
    # when the configured tokenizer.json is gone, the run's own copy is the tokenizer it trained with.
    tok, own = getattr(cfg.data, "tokenizer", ""), os.path.join(run_dir, "tokenizer.json")
    if tok and tok.endswith(".json") and not os.path.isfile(os.path.expanduser(tok)) and os.path.isfile(own):
        cfg.data.tokenizer = os.path.abspath(own)
    return cfg


def check_preset_model(overrides: list[str], conf_dir: str) -> None:
    """`+exp=NAME model=OTHER`: the preset's model keys are for its own model. Keys OTHER does not have would stop
    Hydra's composition with a message about one of them; say instead, in one line, which keys of the preset do
    not apply. The preset's other groups (data, optim, trainer) apply to any model."""
    import os

    choices = {}
    for arg in overrides:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key in ("exp", "model") and value and "," not in value and "(" not in value:
            choices[key] = value
    if set(choices) != {"exp", "model"}:
        return
    exp_file, model_file = (os.path.join(conf_dir, g, f"{choices[g]}.yaml") for g in ("exp", "model"))
    if not (os.path.isfile(exp_file) and os.path.isfile(model_file)):
        return  # Hydra names the missing option
    raw = OmegaConf.load(exp_file)
    preset = raw.get("model") or {}
    schema = next((d[:-len("_schema")] for d in OmegaConf.load(model_file).get("defaults", [])
                   if isinstance(d, str) and d.endswith("_schema")), None)
    if schema not in REGISTRY:
        return
    config = REGISTRY[schema].config
    known = {f.name for f in fields(config)}
    foreign = [f"model.{k}" for k in preset if k not in known or not _merges(config, k, preset[k])]
    if foreign:
        raise ConfigError(f"+exp={choices['exp']} sets {', '.join(foreign)}, which model={choices['model']} does not "
                          f"have in that form (its keys: {sorted(known)}); give the preset's other settings without "
                          f"it: {' '.join(_as_overrides(raw))}")


def _merges(config: type, key: str, value) -> bool:
    try:
        OmegaConf.merge(OmegaConf.structured(config), {key: value})
        return True
    except Exception:
        return False


def _as_overrides(preset: DictConfig) -> list[str]:
    """A preset's group choices and keys, model keys aside, as command-line overrides."""
    import json

    out = []
    for d in preset.get("defaults", []):
        for key, value in (d.items() if OmegaConf.is_dict(d) else []):
            group = key.replace("override", "").strip().lstrip("/")
            if group != "model":
                out.append(f"{group}={value}")
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if OmegaConf.is_dict(value):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value

    walk(OmegaConf.masked_copy(preset, [k for k in preset if k not in ("defaults", "model")]), "")
    out += [f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, list) else v}" for k, v in flat.items()]
    return out


# The checks live in mlsys/validate.py; imported here so that `from mlsys.config import validate` keeps working.
from mlsys.validate import validate  # noqa: E402, F401
