"""PyTorch mirrors of the built-in families (MLP, CNN, GPT and Llama): the same computation, written for torch, loaded from
the trained parameters; each family names its mirror (MLP_MIRROR, ...) in its Family.mirrors["torch"]. Inputs keep
mlsys's layout (images NHWC, tokens (B, T)), so one preprocessing serves JAX, ONNX and torch.
Flax kernels are (in, out), torch weights (out, in): weight = kernel.T."""

import math
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ACT = {"relu": F.relu, "gelu": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh}


class MLP(nn.Module):
    def __init__(self, cfg: dict, in_features: int, classes: int):
        super().__init__()
        dims = [in_features, *cfg["hidden"]]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(cfg["hidden"])))
        self.head = nn.Linear(dims[-1], classes)
        self.act = cfg["activation"]

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = ACT[self.act](layer(x))
        return self.head(x)


class CNN(nn.Module):
    def __init__(self, cfg: dict, input_shape, classes: int):
        super().__init__()
        h, w, c = input_shape
        k = cfg["kernel_size"]
        if k % 2 == 0:
            raise ValueError("the torch mirror supports odd kernel sizes (SAME padding is then symmetric)")
        self.norm, self.pool_kind = cfg["norm"], cfg["pool"]
        self.convs, self.norms, self.pooled = nn.ModuleList(), nn.ModuleList(), []
        for ch in cfg["channels"]:
            self.convs.append(nn.Conv2d(c, ch, k, padding=k // 2))
            self.norms.append(nn.BatchNorm2d(ch, eps=1e-5) if self.norm == "batch"
                              else nn.LayerNorm(ch, eps=1e-6) if self.norm == "layer" else nn.Identity())
            pool = h > 1 and w > 1
            self.pooled.append(pool)
            h, w, c = (h // 2, w // 2, ch) if pool else (h, w, ch)
        self.fc = nn.Linear(h * w * c, cfg["hidden"])
        self.head = nn.Linear(cfg["hidden"], classes)

    def forward(self, x):  # x: B H W C, as in mlsys
        x = x.permute(0, 3, 1, 2)
        for conv, norm, pooled in zip(self.convs, self.norms, self.pooled):
            x = conv(x)
            x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.norm == "layer" else norm(x)
            x = F.relu(x)
            if pooled:
                x = F.max_pool2d(x, 2) if self.pool_kind == "max" else F.avg_pool2d(x, 2)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in NHWC order, as flax does
        return self.head(F.relu(self.fc(x)))


def inv_frequencies(cfg: dict, head_dim: int):
    """As mlsys.models.transformer.rope_frequencies (Llama 3 scaling included)."""
    inv = 1.0 / (cfg["rope_base"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    f = cfg.get("rope_scaling") or 0.0
    if not f:
        return inv
    lo, hi, old = cfg["rope_low_freq_factor"], cfg["rope_high_freq_factor"], cfg["rope_original_max_len"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, (1 - smooth) * scaled / f + smooth * scaled, scaled)


def rope(x, inv, positions=None):
    """x: B T H D; positions: B T (the KV-cache step), else 0..T-1."""
    if positions is None:
        ang = (torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv[None, :])[None]
    else:
        ang = positions.float()[..., None] * inv
    cos, sin = torch.cos(ang)[:, :, None, :], torch.sin(ang)[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def ffn_width(cfg: dict) -> int:
    if cfg["d_ff"]:
        return cfg["d_ff"]
    return 4 * cfg["d_model"] if cfg.get("mlp", "gelu") == "gelu" else -(-8 * cfg["d_model"] // 3 // 32) * 32


def norm(cfg: dict) -> nn.Module:
    if cfg.get("norm", "layer") == "rms":
        return nn.RMSNorm(cfg["d_model"], eps=cfg["norm_eps"])
    return nn.LayerNorm(cfg["d_model"], eps=cfg["norm_eps"], bias=cfg["bias"])


class Block(nn.Module):
    """A gpt or llama block (mlsys.models.transformer.Block): pre-norm, grouped-query attention, GELU or SwiGLU."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, dff, b = cfg["d_model"], ffn_width(cfg), cfg["bias"]
        self.n_head, self.n_kv = cfg["n_head"], cfg.get("n_kv_head") or cfg["n_head"]
        hd = d // self.n_head
        self.rope = cfg["pos_emb"] == "rope"
        self.register_buffer("inv_freq", inv_frequencies(cfg, hd), persistent=False)
        self.ln_1, self.ln_2 = norm(cfg), norm(cfg)
        self.qkv = nn.Linear(d, (self.n_head + 2 * self.n_kv) * hd, bias=b or cfg.get("qkv_bias", False))
        self.proj = nn.Linear(d, d, bias=b)
        self.gelu = "tanh" if cfg.get("gelu_approximate") else "none"
        self.fc, self.fc_out = nn.Linear(d, dff, bias=b), nn.Linear(dff, d, bias=b)
        self.gate = nn.Linear(d, dff, bias=b) if cfg.get("mlp", "gelu") == "swiglu" else None

    def forward(self, x, positions=None, mask=None, past=None):
        """Causal over x alone; or, with the cache (positions B T, mask B 1 T P+T additive, past (key, value)
        B K P Dh), over past + x, returning (x, present) as the ONNX decoder does."""
        b, t, d = x.shape
        h, kv, hd = self.n_head, self.n_kv, d // self.n_head
        q, k, v = self.qkv(self.ln_1(x)).split([h * hd, kv * hd, kv * hd], dim=-1)
        q, k, v = q.view(b, t, h, hd), k.view(b, t, kv, hd), v.view(b, t, kv, hd)
        if self.rope:
            q, k = rope(q, self.inv_freq, positions), rope(k, self.inv_freq, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B H T D
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            present = (k, v)
        if kv != h:
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        normed = self.ln_2(x)
        hidden = self.fc(normed)
        hidden = F.gelu(hidden, approximate=self.gelu) if self.gate is None else F.silu(self.gate(normed)) * hidden
        x = x + self.fc_out(hidden)
        return x if past is None else (x, present)


class GPT(nn.Module):
    """The decoder families gpt and llama (mlsys.models.decoder.Decoder)."""

    def __init__(self, cfg: dict, vocab: int):
        super().__init__()
        padded = math.ceil(vocab / cfg["vocab_multiple"]) * cfg["vocab_multiple"]
        self.vocab, d = vocab, cfg["d_model"]
        self.wte = nn.Embedding(padded, d)
        self.wpe = nn.Embedding(cfg["block_size"], d) if cfg["pos_emb"] == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = norm(cfg)
        self.lm_head = None if cfg["tie_embeddings"] else nn.Linear(d, padded, bias=False)

    def forward(self, tokens):
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe.weight[: tokens.shape[1]][None]
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def head(self, x):
        x = self.ln_f(x)
        logits = x @ self.wte.weight.T if self.lm_head is None else self.lm_head(x)
        if logits.shape[-1] > self.vocab:
            logits = logits.masked_fill(torch.arange(logits.shape[-1]) >= self.vocab, -1e30)
        return logits

    def step(self, input_ids, attention_mask, position_ids, *past):
        """The KV-cache decoder (decoder.onnx's inputs and outputs, in order): past and present are flat
        (key, value) per layer, B K P Dh. Same mask rule as mlsys.models.transformer.past_mask."""
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        kpos = torch.cumsum(attention_mask, dim=1) - 1
        seen = (attention_mask[:, None, :] > 0) & (kpos[:, None, :] <= position_ids[:, :, None])
        # Additive and finite (not a boolean mask): a query that sees nothing (padding) gets a uniform average, as in
        # JAX, instead of NaNs that would then reach real rows through the padding slots' keys and values.
        mask = torch.where(seen, 0.0, -1e30)[:, None]
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, position_ids, mask, (past[2 * i], past[2 * i + 1]))
            present += kv
        return (self.head(x), *present)


class DecoderStep(nn.Module):
    """GPT.step as a module's forward, for torch.export (decoder.pt2)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return self.model.step(input_ids, attention_mask, position_ids, *past)


def _linear(sd: dict, prefix: str, p: dict) -> None:
    sd[f"{prefix}.weight"] = np.asarray(p["kernel"]).T
    if "bias" in p:
        sd[f"{prefix}.bias"] = np.asarray(p["bias"])


def _norm(sd: dict, prefix: str, p: dict) -> None:
    sd[f"{prefix}.weight"] = np.asarray(p["scale"])
    if "bias" in p:
        sd[f"{prefix}.bias"] = np.asarray(p["bias"])


def mlp_state_dict(p: dict) -> dict:
    """Flax parameters (a pure nested dict of nnx.state(model)) → the mirror's state_dict, as numpy arrays."""
    sd: dict = {}
    for i, layer in sorted(p["layers"].items()):
        _linear(sd, f"layers.{i}", layer)
    _linear(sd, "head", p["head"])
    return _contiguous(sd)


def cnn_state_dict(p: dict) -> dict:
    sd: dict = {}
    for i, conv in sorted(p["convs"].items()):
        sd[f"convs.{i}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)  # HWIO → OIHW
        sd[f"convs.{i}.bias"] = np.asarray(conv["bias"])
    for i, norm in sorted(p["norms"].items()):
        if norm:
            _norm(sd, f"norms.{i}", norm)
            if "mean" in norm:
                sd[f"norms.{i}.running_mean"] = np.asarray(norm["mean"])
                sd[f"norms.{i}.running_var"] = np.asarray(norm["var"])
                sd[f"norms.{i}.num_batches_tracked"] = np.asarray(0, np.int64)
    _linear(sd, "fc", p["fc"])
    _linear(sd, "head", p["head"])
    return _contiguous(sd)


def layers(blocks: dict) -> list[dict]:
    """Per-layer parameter dicts of an unrolled stack ({0: ..., 1: ...}) or of a scanned one (every array with a
    leading layer axis), in layer order."""
    if all(isinstance(k, int) for k in blocks):
        return [blocks[i] for i in sorted(blocks)]
    n = next(iter(_leaves(blocks))).shape[0]

    def take(tree, i):
        if isinstance(tree, dict):
            return {k: take(v, i) for k, v in tree.items()}
        try:
            return np.asarray(tree)[i]
        except TypeError:  # an RNG key array (a dropout stream): not a weight
            return None

    return [take(blocks, i) for i in range(n)]


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def gpt_state_dict(p: dict) -> dict:
    sd: dict = {"wte.weight": np.asarray(p["wte"]["embedding"])}
    if p.get("wpe"):
        sd["wpe.weight"] = np.asarray(p["wpe"]["embedding"])
    for i, blk in enumerate(layers(p["blocks"])):
        _norm(sd, f"blocks.{i}.ln_1", blk["ln_1"])
        _norm(sd, f"blocks.{i}.ln_2", blk["ln_2"])
        _linear(sd, f"blocks.{i}.qkv", blk["attn"]["qkv"])
        _linear(sd, f"blocks.{i}.proj", blk["attn"]["proj"])
        _linear(sd, f"blocks.{i}.fc", blk["mlp"]["fc"])
        _linear(sd, f"blocks.{i}.fc_out", blk["mlp"]["proj"])
        if blk["mlp"].get("gate"):
            _linear(sd, f"blocks.{i}.gate", blk["mlp"]["gate"])
    _norm(sd, "ln_f", p["ln_f"])
    if p.get("lm_head"):
        _linear(sd, "lm_head", p["lm_head"])
    return _contiguous(sd)


def _contiguous(sd: dict) -> dict:
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


class Mirror(NamedTuple):
    """A family's torch mirror, named in its Family.mirrors["torch"]: build(model config as a dict, data spec) →
    torch module; state_dict(pure dict of the Flax state) → that module's state_dict."""

    build: Callable[[dict, Any], nn.Module]
    state_dict: Callable[[dict], dict]


MLP_MIRROR = Mirror(lambda cfg, spec: MLP(cfg, int(np.prod(spec.input_shape)), spec.num_classes), mlp_state_dict)
CNN_MIRROR = Mirror(lambda cfg, spec: CNN(cfg, spec.input_shape, spec.num_classes), cnn_state_dict)
# gpt and llama: one decoder mirror
GPT_MIRROR = Mirror(lambda cfg, spec: GPT(cfg, cfg["vocab_size"] or spec.num_classes), gpt_state_dict)
