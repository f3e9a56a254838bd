"""A LoRA run's adapter alone, in PEFT's layout (format=peft): `hf_adapter/` with adapter_config.json and
adapter_model.safetensors, and the frozen model it adapts as a Hugging Face folder `hf_base/` — so that

    base = AutoModelForCausalLM.from_pretrained("<export>/hf_base")
    model = PeftModel.from_pretrained(base, "<export>/hf_adapter")

gives the fine-tuned model, proven by parity (PEFT's logits against JAX's unmerged model) at export.

An mlsys adapter on a fused layer (qkv) adapts several Hugging Face modules at once (Llama's q_proj, k_proj,
v_proj): each gets the shared A and its own columns of B, which is exactly the fused update, rank unchanged.
The names and cuts come from the same table as the weights (mlsys.hf.names); scale alpha/rank is PEFT's too.
"""

import json
import os

import numpy as np
from flax import nnx

from mlsys.export.hf_export import load_transformers, save_safetensors, transformers_logits, write_hf_folder
from mlsys.export.onnx_export import ExportError
from mlsys.models.lora import LoRALinear, merge_lora


def adapters(model: nnx.Module) -> dict[tuple, LoRALinear]:
    """{mlsys path of the adapted layer: its LoRALinear} of an unmerged LoRA model."""
    return {tuple(p): m for p, m in nnx.iter_graph(model) if isinstance(m, LoRALinear)}


def base_model(model: nnx.Module) -> nnx.Module:
    """The frozen model the adapters sit on (QLoRA: dequantized), as a plain model: a copy with B = 0, merged."""
    base = nnx.clone(model)
    for layer in adapters(base).values():
        layer.lora_b.set_value(np.zeros(layer.lora_b.get_value().shape, layer.lora_b.get_value().dtype))
    return merge_lora(base)


def peft_tensors(model: nnx.Module, cfg, vocab: int) -> tuple[dict, list[str], bool]:
    """({PEFT tensor name: array}, the adapted HF module names, fan_in_fan_out) of an unmerged LoRA model."""
    from mlsys.hf.names import mapping

    entries = {e.path: e for e in mapping(cfg, vocab)}
    out, modules, conv1d = {}, [], set()
    for path, layer in adapters(model).items():
        entry = entries.get((*path, "kernel"))
        if entry is None:
            raise ExportError(f"format=peft: the adapted layer {'.'.join(map(str, path))} has no Hugging Face name")
        a, b = np.asarray(layer.lora_a.get_value()), np.asarray(layer.lora_b.get_value())
        if not entry.stacked:
            a, b = a[None], b[None]
        for i, pieces in enumerate(entry.layers):
            for p in pieces:
                d_in, d_out = (p.hf_shape[1], p.hf_shape[0]) if p.transpose else p.hf_shape
                if p.at[0] != 0 or d_in != a.shape[1]:
                    raise ExportError(f"format=peft: {p.hf} takes only part of the input of the adapted layer "
                                      f"{'.'.join(map(str, path))}; PEFT cannot express that adapter")
                module = p.hf.removesuffix(".weight")
                out[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # r, in
                out[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
                    b[i][:, p.at[1]: p.at[1] + d_out].T)  # out, r
                modules.append(module)
                conv1d.add(not p.transpose)  # GPT-2's Conv1D stores (in, out): PEFT's fan_in_fan_out
    if len(conv1d) > 1:
        raise ExportError("format=peft: the adapted layers mix Linear and Conv1D modules; PEFT needs one layout")
    return out, sorted(modules), conv1d.pop()


def export_peft(run, unmerged: nnx.Module, folder: str, x: np.ndarray, want: np.ndarray, tol: float, parity,
                final: str) -> dict:
    """Write `folder`/hf_base (the frozen model) and `folder`/hf_adapter (PEFT), and prove them together; `final`
    is where the export folder will live (the adapter names its base there)."""
    lora = run.cfg.lora
    base_dir, adapter_dir = os.path.join(folder, "hf_base"), os.path.join(folder, "hf_adapter")
    base_info = write_hf_folder(run, base_model(unmerged), base_dir)
    tensors, modules, fan_in_fan_out = peft_tensors(unmerged, run.cfg.model, base_info["vocab_size"])
    os.makedirs(adapter_dir)
    save_safetensors(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False,
              "target_modules": modules, "inference_mode": True, "init_lora_weights": True,
              # where the base sits in this export; init_from names where it came from (a run, or hf:<folder>)
              "base_model_name_or_path": os.path.join(final, "hf_base")}
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_transformers(base_dir), adapter_dir).eval()
    diff = parity("PEFT (hf_base + hf_adapter)", transformers_logits(model, x), want[..., : base_info["vocab_size"]],
                  tol)
    return {"base": "hf_base", "adapter": "hf_adapter", "rank": lora.rank, "alpha": lora.alpha,
            "target_modules": len(modules), "init_from": run.cfg.trainer.init_from, "max_abs_diff": diff,
            "files": {"hf_base": base_info["files"], "hf_adapter": ["adapter_config.json", "adapter_model.safetensors"]}}
