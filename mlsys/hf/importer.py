"""A Hugging Face model folder as an mlsys run dir (config.yaml, tokenizer.json, an orbax checkpoint at step 0),
which export, generate, serve, load_run and trainer.init_from accept like any trained run. Everything is checked
before anything is written, and the run dir appears whole (renamed into place) or not at all."""

import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf

from mlsys.config import Config, LoggerConfig
from mlsys.data.sources import SyntheticConfig, TextConfig
from mlsys.errors import ConfigError
from mlsys.hf.config import from_hf, read_config
from mlsys.hf.load import HFSource
from mlsys.models import REGISTRY
from mlsys.parallel import MeshConfig, make_mesh, param_shardings
from mlsys.spec import DataSpec
from mlsys.train.state import abstract_model, new_model, split_model

log = logging.getLogger("mlsys")


def read_tokenizer(folder: str, rows: int):
    """The folder's tokenizer.json (None when it has none); it must not have more ids than the embedding rows."""
    from mlsys.tokenizer import load_file

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        tok = load_file(path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
    if tok.vocab_size > rows:
        raise ConfigError(f"{path} has {tok.vocab_size} ids but the model has {rows} embedding rows (config.json "
                          f"vocab_size); give the tokenizer.json that belongs to this model")
    return tok


def place_params(src: HFSource, model_cfg, spec: DataSpec, mesh, rules: dict, seed: int = 0):
    """The model's parameters from `src`, each born in its NamedSharding on `mesh`, and its other variables (RNG
    streams) freshly made there. Returns (eval graphdef, params, rest)."""
    eval_def, params, rest = split_model(abstract_model(model_cfg, spec, seed), train=False)
    shardings = param_shardings({"params": params, "rest": rest}, mesh, rules)
    flat = [(p, v.replace(src.array(p, s.get_value(), v.dtype)))
            for (p, v), (_, s) in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings["params"]))]

    def fresh_rest():  # the parameters' initialisation is dead code here: XLA drops it
        return split_model(new_model(model_cfg, spec, seed), train=False)[2]

    rest = jax.jit(fresh_rest, out_shardings=shardings["rest"])()
    return eval_def, nnx.from_flat_state(flat), rest


def import_folder(folder: str, out: str | None = None, mesh_cfg: MeshConfig | None = None) -> str:
    """Write the run dir `out` (default runs/hf_import/<folder name>) for the Hugging Face model in `folder`."""
    folder = os.path.abspath(folder)
    hf = read_config(folder)
    family, keys = from_hf(hf, os.path.join(folder, "config.json"))
    model_cfg = REGISTRY[family].config(**keys)
    out = os.path.abspath(out or os.path.join("runs", "hf_import", os.path.basename(folder.rstrip(os.sep))))
    if os.path.exists(out):
        raise ConfigError(f"out={out}: already exists; choose a new run dir (nothing there is overwritten)")
    tok = read_tokenizer(folder, keys["vocab_size"])
    seq_len = min(model_cfg.block_size, 256)
    data = (TextConfig(tokenizer=os.path.join(out, "tokenizer.json"), seq_len=seq_len) if tok is not None else
            SyntheticConfig(task="lm", vocab_size=keys["vocab_size"], seq_len=seq_len))
    if tok is None:
        log.warning("%s has no tokenizer.json: the run dir uses synthetic token data (no text prompts)", folder)
    cfg = Config(name="hf_import", model=model_cfg, data=data, mesh=mesh_cfg or MeshConfig(),
                 logger=LoggerConfig(name="jsonl"))
    spec = DataSpec("lm", (seq_len,), "int32", keys["vocab_size"])
    mesh = make_mesh(cfg.mesh)
    with HFSource(folder, model_cfg, keys["vocab_size"]) as src:  # every tensor checked here, before any write
        _, params, rest = place_params(src, model_cfg, spec, mesh, cfg.mesh.param_rules)
    tmp = f"{out}.importing-{os.getpid()}"
    try:
        os.makedirs(tmp)
        if tok is not None:
            tok.save(tmp)
        OmegaConf.save(OmegaConf.structured(cfg), os.path.join(tmp, "config.yaml"))
        n_params = sum(x.size for x in jax.tree.leaves(params))
        with open(os.path.join(tmp, "env.json"), "w") as f:
            json.dump({"imported_from": folder, "hf_model_type": hf.get("model_type"), "n_params": int(n_params),
                       "start_step": 0}, f, indent=1)
        # orbax copies arrays to host buffers to write them; bounding the bytes in flight to the largest array
        # keeps that from being a second copy of the whole model.
        largest = max(x.nbytes for x in jax.tree.leaves(params))
        handler = ocp.StandardCheckpointHandler(save_concurrent_gb=(largest + 2**20) / 1e9)
        manager = ocp.CheckpointManager(os.path.join(tmp, "checkpoints"), options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False), item_handlers={"state": handler})
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "rest": rest})))
        manager.wait_until_finished()
        manager.close()
        os.makedirs(os.path.dirname(out), exist_ok=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
