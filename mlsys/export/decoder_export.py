"""The language models' second ONNX graph: a decoder with its KV cache (decoder.onnx), in the layout of ONNX
Runtime GenAI and optimum, so a server generates one token per call instead of recomputing the whole window.

    inputs   input_ids [B, T], attention_mask [B, P+T], position_ids [B, T]            (int32)
             past_key_values.{i}.key / .value [B, n_kv_head, P, head_dim]             (float32, i < n_layer)
    outputs  logits [B, T, V], present.{i}.key / .value [B, n_kv_head, P+T, head_dim]

B, P and T are symbolic; P = 0 is the prefill. The graph is Decoder.step (the same blocks and attention as
training and mlsys.generate, with the cache appended rather than written into fixed slots), traced by jax2onnx.
mlsys.serve.decoder runs it; mlsys.export.decoder_parity gates it against mlsys.generate."""

import jax
import jax.numpy as jnp
from flax import nnx

from mlsys.export.onnx_export import ExportError, export_view, quiet_onnx_ir
from mlsys.models.transformer import Past

INPUTS = ("input_ids", "attention_mask", "position_ids")


def cache_names(n_layer: int, prefix: str) -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ... (prefix "present": outputs)."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def layout(model: nnx.Module) -> dict:
    """The cache's dimensions, as the manifest and the runtime wrapper name them."""
    from mlsys.models.stack import layer_count

    kv, hd = model.cache_heads
    return {"n_layer": layer_count(model.blocks), "n_kv_head": kv, "head_dim": hd, "vocab": model.vocab,
            "max_len": model.block_size}


def step_function(model: nnx.Module):
    """Decoder.step over flat per-layer cache arrays in ONNX's B K P Dh layout (the model's cache is L B P K Dh)."""
    view = export_view(model)

    def step(input_ids, attention_mask, position_ids, *past):
        keys = jnp.stack([p.transpose(0, 2, 1, 3) for p in past[0::2]])
        values = jnp.stack([p.transpose(0, 2, 1, 3) for p in past[1::2]])
        logits, present = view.step(input_ids, attention_mask, position_ids, Past(keys, values))
        flat = []
        for i in range(keys.shape[0]):
            flat += [present.key[i].transpose(0, 2, 1, 3), present.value[i].transpose(0, 2, 1, 3)]
        return (logits, *flat)

    return step


def to_onnx_decoder(model: nnx.Module, path: str) -> dict:
    """Write decoder.onnx for a Decoder (gpt, llama); returns the manifest's "decoder" entry (without parity)."""
    import jax2onnx
    import onnx

    quiet_onnx_ir()
    dims = layout(model)
    b, p, t = jax.export.symbolic_shape("B, P, T", constraints=["T >= 1"])
    ints = [jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, p + t), jnp.int32),
            jax.ShapeDtypeStruct((b, t), jnp.int32)]
    past = jax.ShapeDtypeStruct((b, dims["n_kv_head"], p, dims["head_dim"]), jnp.float32)
    past_names, present_names = cache_names(dims["n_layer"], "past_key_values"), cache_names(dims["n_layer"], "present")
    try:
        proto = jax2onnx.to_onnx(step_function(model), [*ints, *[past] * len(past_names)], model_name="mlsys_decoder",
                                 input_names=[*INPUTS, *past_names], output_names=["logits", *present_names])
    except Exception as e:
        raise ExportError(f"jax2onnx cannot convert the KV-cache decoder: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    _fix_shapes(proto, set(present_names))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    cache = ["B", "n_kv_head", "P", "head_dim"]
    return {
        "file": "decoder.onnx",
        "inputs": {"input_ids": ["B", "T"], "attention_mask": ["B", "P+T"], "position_ids": ["B", "T"],
                   **{n: cache for n in past_names}},
        "outputs": {"logits": ["B", "T", "V"], **{n: ["B", "n_kv_head", "P+T", "head_dim"] for n in present_names}},
        "cache_layout": "past_key_values.{i}.key|value [B, n_kv_head, P, head_dim] in, present.{i}.key|value "
                        "[B, n_kv_head, P+T, head_dim] out (past and new concatenated on axis 2); attention_mask "
                        "[B, P+T] (1 = real token, rows may be left-padded); position_ids = (cumsum(attention_mask)"
                        " - 1) at the new slots",
    }


def _fix_shapes(proto, present: set) -> None:
    """jax2onnx 0.17.1 annotates a concatenation along a symbolic axis with the first operand's length (P, not
    P+T): ONNX Runtime then plans its buffers from that and fails at run time. Drop the intermediate shape
    annotations (ORT infers them) and give the present outputs the attention mask's length."""
    del proto.graph.value_info[:]
    total = next(i for i in proto.graph.input if i.name == "attention_mask").type.tensor_type.shape.dim[1].dim_param
    for out in proto.graph.output:
        if out.name in present:
            dim = out.type.tensor_type.shape.dim[2]
            dim.ClearField("dim_value")
            dim.dim_param = total


def export_decoder(run, folder: str, prompts: list[list[int]], formats, quantize: str | None, tol: float,
                   n_tokens: int = 64) -> dict:
    """decoder.onnx (and decoder.int8.onnx) and the torch program decoder.pt2 for a gpt/llama run, each gated:
    greedy generation with the cache, all prompts in one left-padded batch, must give mlsys.generate's tokens
    exactly, and its logits at every step must match the JAX model's within `tol`; otherwise ExportError (the
    caller writes nothing). Generation is capped so that every position stays inside the model's block (no
    sliding window)."""
    import os

    import numpy as np

    from mlsys.generate import generate
    from mlsys.serve.decoder import Decoder, empty_past, greedy

    info = {**layout(run.model), "int_dtype": "int32", "dtype": "float32"}
    tok = run.dataset.tokenizer
    info["eos"] = tok.specials.get("eos") if tok is not None else None
    n = min(n_tokens, info["max_len"] - max(len(p) for p in prompts))
    want = generate(run.model, prompts, n, temperature=0)
    # The JAX logits of every generated position: one full forward pass over prompt + continuation (right-padded
    # to one length; causal, so the padding changes nothing before it).
    seqs = [p + w for p, w in zip(prompts, want)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, q in enumerate(seqs):
        batch[i, : len(q)] = q
    logits = np.asarray(run.model(jnp.asarray(batch)))
    full = [logits[i, len(p) - 1: len(p) - 1 + n] for i, p in enumerate(prompts)]
    info["parity"] = {"tokens": n, "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                      "tolerance": tol, "reference": "mlsys.generate greedy (temperature 0); the cached graph runs "
                                                     "all prompts as one left-padded batch"}
    if "onnx" in formats:
        info.update(to_onnx_decoder(run.model, os.path.join(folder, "decoder.onnx")))
        fp32 = Decoder(folder, manifest={"decoder": info})
        info["parity"]["onnx_max_abs_logit_diff"] = gate("decoder.onnx", fp32.greedy(prompts, n), want, full, tol)
        if quantize == "int8":
            from mlsys.export.onnx_export import quantize_int8

            quantize_int8(os.path.join(folder, "decoder.onnx"), os.path.join(folder, "decoder.int8.onnx"))
            info["int8_file"] = "decoder.int8.onnx"
            q, _ = Decoder(folder, precision="int8", manifest={"decoder": info}).greedy(prompts, n)
            info["int8_agreement"] = float(np.mean([a == b for qs, ws in zip(q, want) for a, b in zip(qs, ws)]))
    if "torch" in formats:
        from mlsys.export.torch_export import export_torch_decoder

        info["torch"], step = export_torch_decoder(run, folder)
        got = greedy(step, empty_past(info, len(prompts)), prompts, n)
        info["parity"]["torch_max_abs_logit_diff"] = gate("decoder.pt2", got, want, full, tol)
    info["parity"]["tokens_equal"] = True
    return info


def gate(name: str, got: tuple, want: list[list[int]], full: list, tol: float) -> float:
    """Tokens equal to mlsys.generate's and every step's logits within tol of JAX's; returns the max |diff|."""
    import numpy as np

    tokens, logits = got
    for i, (g, w) in enumerate(zip(tokens, want)):
        if g != w:
            at = next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)
            raise ExportError(f"parity failed: {name}'s greedy generation (KV cache) differs from mlsys.generate for "
                              f"prompt {i} at new token {at} ({g[at]} vs {w[at]}); the export was not written")
    diff = float(max(np.max(np.abs(logits[:, i].astype(np.float64) - f)) for i, f in enumerate(full)))
    if not diff <= tol:
        raise ExportError(f"parity failed: {name}'s logits differ from JAX by max |diff| = {diff:.3g} > {tol:g} over "
                          f"{len(tokens[0])} greedy steps; the export was not written")
    return diff
