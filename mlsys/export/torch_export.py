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
