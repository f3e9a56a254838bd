"""Hugging Face config.json ⇄ mlsys model config, for the decoder families: `gpt` is GPT-2 (GPT2LMHeadModel),
`llama` is Llama (LlamaForCausalLM) and the models whose weights map the same way (Mistral, Qwen2). What mlsys
cannot compute the same way (another activation, a rope type other than Llama 3's, a sliding window inside the
block) is refused with the key that says so, never imported into a model that computes something else."""

import json
import os
from dataclasses import replace

from mlsys.errors import ConfigError
from mlsys.models.family import REGISTRY
from mlsys.models.transformer import ffn_width, kv_heads

# HF model_type -> mlsys family; HF architecture -> model_type.
FAMILIES = {"gpt2": "gpt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
SUPPORTED = ", ".join(f"{t} ({a})" for a, t in ARCHITECTURES.items())
GELU_EXACT, GELU_TANH = ("gelu",), ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# The model keys config.json decides (the rest, e.g. dtype, remat, scan_layers, vocab_multiple, stay the user's).
MAPPED = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "block_size", "vocab_size", "pos_emb", "rope_base",
          "rope_scaling", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len", "norm", "norm_eps",
          "mlp", "gelu_approximate", "tie_embeddings", "bias", "qkv_bias")


def read_config(folder: str) -> dict:
    """A Hugging Face model folder's config.json as a dict."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r}: no such folder; give a local Hugging Face model folder (config.json, "
                          f"*.safetensors, tokenizer.json), e.g. one saved with save_pretrained")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing; a Hugging Face model folder has a config.json beside its weights "
                          f"(save it with model.save_pretrained or download the model's config.json too)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({str(e).splitlines()[0][:200]}); give the model's "
                          f"config.json as transformers wrote it") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a JSON object; give the model's config.json as transformers wrote it")
    return cfg


def _rope(hf: dict, where: str) -> dict:
    """rope_theta and rope scaling, from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    out = {"rope_base": float(theta), "rope_scaling": 0.0}
    if kind == "default":
        return out
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type {kind!r} is not supported (mlsys computes 'default' and 'llama3' "
                          f"rotary frequencies); import a model that uses one of those")
    return out | {"rope_scaling": float(scaling["factor"]), "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                  "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                  "rope_original_max_len": int(scaling["original_max_position_embeddings"])}


def _need(hf: dict, key: str, where: str):
    if hf.get(key) is None:
        raise ConfigError(f"{where}: key {key!r} is missing; a config.json saved by transformers has it")
    return hf[key]


def _gpt2(hf: dict, where: str) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_EXACT + GELU_TANH:
        raise ConfigError(f"{where}: activation_function={act!r} is not supported; mlsys's GPT-2 computes "
                          f"{list(GELU_EXACT + GELU_TANH)}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if hf.get(key, want) != want:
            raise ConfigError(f"{where}: {key}={hf[key]!r} is not supported (mlsys's attention needs {want}); "
                              f"import a standard GPT-2")
    d = int(_need(hf, "n_embd", where))
    return {"n_layer": int(_need(hf, "n_layer", where)), "n_head": int(_need(hf, "n_head", where)), "n_kv_head": 0,
            "d_model": d, "d_ff": int(hf.get("n_inner") or 4 * d), "block_size": int(_need(hf, "n_positions", where)),
            "vocab_size": int(_need(hf, "vocab_size", where)), "pos_emb": "learned", "norm": "layer",
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "mlp": "gelu",
            "gelu_approximate": act in GELU_TANH, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "bias": True, "qkv_bias": False}


def _llama(hf: dict, where: str, kind: str, block_size: int | None) -> dict:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported; mlsys's llama MLP is SwiGLU ('silu')")
    d, h = int(_need(hf, "hidden_size", where)), int(_need(hf, "num_attention_heads", where))
    if hf.get("head_dim") not in (None, d // h):
        raise ConfigError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads="
                          f"{d // h}; mlsys's attention needs head_dim = hidden_size / num_attention_heads")
    bias, qkv_bias = False, kind == "qwen2"  # Qwen2: biases on q, k, v only
    if kind != "qwen2" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        if not (hf.get("attention_bias") and hf.get("mlp_bias")):
            raise ConfigError(f"{where}: attention_bias={hf.get('attention_bias')}, mlp_bias={hf.get('mlp_bias')}: "
                              f"mlsys has biases on every projection or on none (or on q/k/v only); import a model "
                              f"with both or neither")
        bias = True
    max_len = int(_need(hf, "max_position_embeddings", where))
    block = block_size or max_len
    window = hf.get("sliding_window") if (kind == "mistral" or hf.get("use_sliding_window")) else None
    if window is not None and int(window) < block:
        raise ConfigError(f"{where}: sliding_window={window} is shorter than the block ({block} positions): "
                          f"attention inside the block would differ; import with model=llama model.block_size={window}")
    n_kv = int(hf.get("num_key_value_heads") or h)
    return {"n_layer": int(_need(hf, "num_hidden_layers", where)), "n_head": h, "n_kv_head": n_kv, "d_model": d,
            "d_ff": int(_need(hf, "intermediate_size", where)), "block_size": block,
            "vocab_size": int(_need(hf, "vocab_size", where)), "pos_emb": "rope", **_rope(hf, where), "norm": "rms",
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)), "mlp": "swiglu", "gelu_approximate": False,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "bias": bias, "qkv_bias": qkv_bias}


def model_type(hf: dict, where: str = "config.json") -> str:
    """The HF model_type, checked against the supported ones (and against `architectures` when given)."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ConfigError(f"{where}: model_type={kind!r} is not supported; mlsys imports {SUPPORTED}")
    archs = hf.get("architectures") or []
    if archs and archs[0] not in ARCHITECTURES:
        raise ConfigError(f"{where}: architectures={archs} is not a causal language model mlsys maps; it imports "
                          f"{SUPPORTED}")
    return kind


def from_hf(hf: dict, where: str = "config.json", block_size: int | None = None) -> tuple[str, dict]:
    """(mlsys family name, {model key: value}) for the model a config.json describes. `block_size` (rope models
    only) asks for a block shorter than max_position_embeddings."""
    kind = model_type(hf, where)
    keys = _gpt2(hf, where) if kind == "gpt2" else _llama(hf, where, kind, block_size)
    return FAMILIES[kind], keys


def apply(model_cfg, hf: dict, where: str = "config.json"):
    """`model_cfg` (the user's composed model config) with the keys config.json decides. A config of another
    family (e.g. the default mlp) is replaced by the right one; keys the user moved away from the family's defaults
    must agree with config.json (model.block_size may be lower for rope models: it is a limit, not a weight)."""
    kind = model_type(hf, where)
    family = FAMILIES[kind]
    cls = REGISTRY[family].config
    if model_cfg.name not in FAMILIES.values():
        return cls(**from_hf(hf, where)[1])
    if model_cfg.name != family:
        raise ConfigError(f"model={model_cfg.name}, but {where} describes a {kind} model (mlsys model={family}); "
                          f"use model={family} or leave model= out")
    default = cls()
    given = {k for k in MAPPED if getattr(model_cfg, k) != getattr(default, k)}
    # A lower block for a rope model is a limit, not a contradiction (above max_position_embeddings it is one).
    lower = "block_size" in given and kind != "gpt2" and \
        model_cfg.block_size <= int(hf.get("max_position_embeddings") or 0)
    _, keys = from_hf(hf, where, model_cfg.block_size if lower else None)
    clash = [f"model.{k}={getattr(model_cfg, k)!r} (config.json: {keys[k]!r})" for k in MAPPED
             if k in given and getattr(model_cfg, k) != keys[k]]
    if clash:
        raise ConfigError(f"{where} contradicts the model overrides given with it: {'; '.join(clash)}; drop those "
                          f"overrides (the imported model's config decides them)")
    return replace(model_cfg, **keys)


def check_mappable(m) -> str:
    """The HF model_type an mlsys decoder config exports to (gpt2, llama, qwen2), or a ConfigError naming the key
    that has no Hugging Face equivalent."""
    if m.name not in ("gpt", "llama"):
        raise ConfigError(f"model={m.name} has no Hugging Face mapping; format=hf exports model=gpt (GPT-2) and "
                          f"model=llama (Llama; Qwen2 with model.qkv_bias)")
    want = {"pos_emb": "learned", "norm": "layer", "mlp": "gelu", "bias": True} if m.name == "gpt" else \
        {"pos_emb": "rope", "norm": "rms", "mlp": "swiglu"}
    bad = [f"model.{k}={getattr(m, k)!r} (needs {v!r})" for k, v in want.items() if getattr(m, k) != v]
    if m.name == "gpt" and kv_heads(m) != m.n_head:
        bad.append(f"model.n_kv_head={m.n_kv_head} (GPT-2 has no grouped-query attention: 0)")
    if bad:
        hf = "GPT-2" if m.name == "gpt" else "Llama"
        raise ConfigError(f"model={m.name} maps to {hf}, which cannot hold {', '.join(bad)}; train with those "
                          f"values to export to Hugging Face")
    if m.name == "gpt":
        return "gpt2"
    return "qwen2" if m.qkv_bias and not m.bias else "llama"


def to_hf(m, vocab: int) -> dict:
    """The config.json of the Hugging Face model that computes what the mlsys decoder `m` computes; `vocab` is the
    real vocabulary (model.vocab_size or the data's). Padding rows (vocab_multiple) are not part of it."""
    kind = check_mappable(m)
    arch = next(a for a, t in ARCHITECTURES.items() if t == kind)
    common = {"architectures": [arch], "model_type": kind, "vocab_size": vocab,
              "tie_word_embeddings": m.tie_embeddings, "dtype": m.param_dtype, "use_cache": True}
    if kind == "gpt2":
        return common | {"n_embd": m.d_model, "n_layer": m.n_layer, "n_head": m.n_head, "n_inner": ffn_width(m),
                         "n_positions": m.block_size, "layer_norm_epsilon": m.norm_eps,
                         "activation_function": "gelu_new" if m.gelu_approximate else "gelu",
                         "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
                         "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                         "reorder_and_upcast_attn": False}
    rope = {"rope_type": "default", "rope_theta": m.rope_base}
    if m.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": m.rope_base, "factor": m.rope_scaling,
                "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                "original_max_position_embeddings": m.rope_original_max_len}
    out = common | {"hidden_size": m.d_model, "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
                    "num_key_value_heads": kv_heads(m), "head_dim": m.d_model // m.n_head,
                    "intermediate_size": ffn_width(m), "max_position_embeddings": m.block_size,
                    "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "attention_dropout": m.dropout,
                    "rope_parameters": rope, "rope_theta": m.rope_base}
    if kind == "llama":
        out |= {"attention_bias": m.bias, "mlp_bias": m.bias}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None}
    return out

