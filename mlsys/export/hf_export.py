"""The Hugging Face side of an export (format=hf): a folder `hf/` that `transformers.AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained` load with no custom code — config.json, model.safetensors, generation_config.json
and the run's tokenizer as a fast tokenizer — proven by parity: transformers' logits on the run's held-out data
against JAX's, within the tolerance, or ExportError and nothing written.

The tensors come from the one name table that import uses too (mlsys.hf.names): a gpt run becomes a
GPT2LMHeadModel, a llama run a LlamaForCausalLM; vocabulary padding rows (model.vocab_multiple) are cut off; a
LoRA run arrives here with its adapters merged (mlsys.export.restore)."""

import json
import os

import numpy as np
from flax import nnx

from mlsys.errors import ConfigError
from mlsys.export.hf_tokenizer import save_hf_tokenizer
from mlsys.export.onnx_export import ExportError


def hf_families() -> list[str]:
    """The model families that have a Hugging Face mapping."""
    from mlsys.hf.config import FAMILIES

    return sorted(set(FAMILIES.values()))


def check_family(name: str, fmt: str = "hf") -> None:
    """One line naming the families that export to Hugging Face, for any other."""
    families = hf_families()
    if name not in families:
        raise ExportError(f"format={fmt}: model={name} has no Hugging Face mapping; the families that export to "
                          f"Hugging Face are {', '.join(families)} (use format=onnx,torch for {name})")


def check_config(cfg, formats) -> None:
    """format=hf/peft: what the run's saved config alone decides, before anything is restored or written."""
    from mlsys.hf.config import check_mappable

    fmt = "hf" if "hf" in formats else "peft"
    check_family(cfg.model.name, fmt)
    try:
        check_mappable(cfg.model)  # e.g. a gpt with rope or swiglu: GPT-2 cannot express it
    except ConfigError as e:
        raise ExportError(f"format={fmt}: {e}") from None
    if "peft" in formats and not cfg.lora.rank:
        raise ExportError("format=peft exports a LoRA fine-tune's adapter, but this run has lora.rank=0 (no "
                          "adapter); use format=hf for the whole model")
    import importlib.util

    for fmt, package in (("hf", "transformers"), ("peft", "transformers"), ("peft", "peft")):
        if fmt in formats and importlib.util.find_spec(package) is None:  # parity needs them: no unproven export
            raise ExportError(f"format={fmt} needs `{package}` (its parity check loads the export with it): "
                              f"pip install '.[hf]'")


def hf_tensors(model: nnx.Module, cfg, vocab: int) -> dict[str, np.ndarray]:
    """{HF tensor name: array} of a plain (merged, unmasked) gpt/llama model; padding rows stripped."""
    from mlsys.hf.names import mapping, piece_of

    flat = {tuple(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    entries = mapping(cfg, vocab)
    missing = [e.path for e in entries if e.path not in flat]
    extra = sorted(set(flat) - {e.path for e in entries}, key=str)
    if missing or extra:  # a model this code does not know how to name: never a silently partial checkpoint
        raise ExportError(f"format=hf: the model's parameters do not match the Hugging Face mapping of "
                          f"model={cfg.name} (missing {missing[:3]}, unmapped {extra[:3]})")
    out = {}
    for e in entries:
        for i, pieces in enumerate(e.layers):
            for p in pieces:
                out[p.hf] = np.ascontiguousarray(piece_of(e, i, p, flat[e.path]))
    return out


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """model.safetensors as transformers writes it (metadata format=pt); bfloat16 stays bfloat16."""
    import torch
    from safetensors.torch import save_file

    def to_torch(a):
        if a.dtype.name == "bfloat16":  # numpy's (ml_dtypes) bfloat16 has no torch.from_numpy
            return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(a))  # a copy: arrays from JAX are read-only

    save_file({k: to_torch(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def hf_config(run, vocab: int) -> dict:
    """config.json: the model's (mlsys.hf.config.to_hf) with the tokenizer's special ids."""
    from mlsys.hf.config import to_hf

    config = to_hf(run.cfg.model, vocab)  # mappable: check_config ran before the run was restored
    specials = run.dataset.tokenizer.specials if run.dataset.tokenizer is not None else {}
    for name in ("bos", "eos", "pad"):  # HF's defaults (GPT-2: 50256) would point outside a small vocabulary
        config[f"{name}_token_id"] = specials.get(name)
    return config


def write_hf_folder(run, model: nnx.Module, folder: str) -> dict:
    """config.json, model.safetensors, generation_config.json and the tokenizer files into `folder`."""
    os.makedirs(folder, exist_ok=True)
    vocab = model.vocab
    config = hf_config(run, vocab)
    save_safetensors(hf_tensors(model, run.cfg.model, vocab), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    files = ["config.json", "model.safetensors", "generation_config.json"]
    if run.dataset.tokenizer is not None:
        files += save_hf_tokenizer(run.dataset.tokenizer, folder, run.cfg.model.block_size)
    return {"architecture": config["architectures"][0], "model_type": config["model_type"], "vocab_size": vocab,
            "files": files}


def transformers_logits(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x, np.int64))).logits.float().numpy()


def load_transformers(folder: str):
    """The folder loaded as any user would: AutoModelForCausalLM, no custom code, float32, evaluation mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a loading bar per parity check is noise in the export's output
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def export_hf(run, folder: str, x: np.ndarray, want: np.ndarray, tol: float, parity) -> dict:
    """Write `folder`/hf and prove it: transformers' logits against JAX's `want` on held-out `x`."""
    hf_dir = os.path.join(folder, "hf")
    info = write_hf_folder(run, run.model, hf_dir)
    got = transformers_logits(load_transformers(hf_dir), x)
    info["max_abs_diff"] = parity("transformers", got, want[..., : info["vocab_size"]], tol)
    info["folder"] = "hf"
    return info
