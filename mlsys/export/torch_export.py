"""The PyTorch side of an export: the mirror module with the run's weights (model.safetensors) and a self-contained
torch.export program (model.pt2) that runs with torch alone."""

import os

import numpy as np
import torch
from flax import nnx
from safetensors.numpy import save_file

from mlsys.export.onnx_export import ExportError


def export_torch(run, family, folder: str, x: np.ndarray, want: np.ndarray, tol: float) -> dict:
    """The torch mirror of `family` (mlsys.models.Family.mirrors["torch"]) loaded with the run's weights."""
    from dataclasses import asdict

    mirror, cfg, spec = family.mirror("torch"), asdict(run.cfg.model), run.dataset.spec
    sd = mirror.state_dict(nnx.to_pure_dict(nnx.state(run.model)))
    save_file(sd, os.path.join(folder, "model.safetensors"))
    module = mirror.build(cfg, spec).eval()
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    example = torch.from_numpy(x[:2].astype(np.int64 if spec.task == "lm" else np.float32))
    batch = torch.export.Dim("B", min=1, max=4096)
    dims = {0: batch}
    if spec.task == "lm":
        dims[1] = torch.export.Dim("T", min=2, max=family.max_len(run.cfg.model) or spec.input_shape[0])
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({**dims},))
    except Exception as e:
        raise ExportError(f"torch.export failed for the {family.name} mirror: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    torch.export.save(program, os.path.join(folder, "model.pt2"))
    with torch.no_grad():
        got = program.module()(torch.from_numpy(x.astype(np.int64 if spec.task == "lm" else np.float32))).numpy()
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    if not diff <= tol:
        raise ExportError(f"parity failed: the PyTorch mirror differs from JAX by max |diff| = {diff:.3g} > {tol:g} "
                          f"on held-out inputs; the export was not written")
    return {"weights": "model.safetensors", "program": "model.pt2", "max_abs_diff": diff,
            "inputs": "int64 tokens (B, T)" if spec.task == "lm" else "float32 (B, *input_shape)"}


def export_torch_decoder(run, folder: str) -> tuple[dict, object]:
    """decoder.pt2: the torch mirror's KV-cache step (GPT.step: decoder.onnx's inputs and outputs, int64 ids) as a
    torch.export program with symbolic batch, past and new lengths. Returns (manifest entry, a numpy step
    function with mlsys.serve.decoder.Decoder.step's signature, for the parity gate)."""
    from dataclasses import asdict

    from mlsys.export.decoder_export import layout
    from mlsys.export.torch_mirror import DecoderStep
    from mlsys.models import family_of

    family, spec = family_of(run.cfg.model), run.dataset.spec
    mirror, dims = family.mirror("torch"), layout(run.model)
    module = mirror.build(asdict(run.cfg.model), spec).eval()
    sd = mirror.state_dict(nnx.to_pure_dict(nnx.state(run.model)))
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    n, kv, hd, max_len = dims["n_layer"], dims["n_kv_head"], dims["head_dim"], dims["max_len"]
    b, p, t = (torch.export.Dim("B", min=1, max=4096), torch.export.Dim("P", min=0, max=max_len - 1),
               torch.export.Dim("T", min=1, max=max_len))
    s = torch.export.Dim("S", min=1, max=2 * max_len)  # = P + T; torch.export finds the relation itself
    ints = (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 7, dtype=torch.int64),
            torch.zeros(2, 3, dtype=torch.int64))
    # Distinct tensors: torch.export ties inputs that are one object, and would then read layer 0's past everywhere.
    past = tuple(torch.zeros(2, kv, 4, hd) for _ in range(2 * n))
    dynamic = ({0: b, 1: t}, {0: b, 1: s}, {0: b, 1: t}, tuple({0: b, 2: p} for _ in range(2 * n)))
    try:
        program = torch.export.export(DecoderStep(module).eval(), (*ints, *past), dynamic_shapes=dynamic)
    except Exception as e:
        raise ExportError(f"torch.export failed for the {family.name} KV-cache decoder: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    torch.export.save(program, os.path.join(folder, "decoder.pt2"))
    fn = program.module()

    def step(input_ids, attention_mask, position_ids, past):
        flat = [torch.from_numpy(np.ascontiguousarray(a)) for pair in past for a in pair]
        with torch.no_grad():
            out = fn(*(torch.from_numpy(np.asarray(a, np.int64)) for a in (input_ids, attention_mask, position_ids)),
                     *flat)
        out = [o.numpy() for o in out]
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(n)]

    return {"program": "decoder.pt2", "inputs": "input_ids, attention_mask, position_ids int64, then "
            "past_key_values.{i}.key/value float32 [B, n_kv_head, P, head_dim] (as decoder.onnx)",
            "outputs": "logits, then present.{i}.key/value"}, step
