"""The production bridge: a trained run → an export folder with ONNX, a PyTorch mirror (safetensors weights and a
self-contained torch.export program), optional INT8, reference statistics and a signed manifest (pipeline.py).

Attributes load lazily: the model server imports `mlsys.export.manifest` and `mlsys.export.reference` (numpy and
cryptography only) without pulling in JAX, Flax, orbax or jax2onnx.
"""

import importlib

_LAZY = {"export_run": "pipeline", "held_out": "pipeline", "FORMATS": "pipeline", "ExportError": "onnx_export",
         "verify": "manifest"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mlsys.export.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mlsys.export' has no attribute {name!r}")


__all__ = ["export_run", "verify", "ExportError", "FORMATS"]
