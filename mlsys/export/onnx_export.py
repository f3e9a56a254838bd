"""ONNX through jax2onnx: symbolic batch (and sequence) dimensions, onnx.checker, ONNX Runtime, INT8."""

import logging
import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # onnxruntime writes telemetry files otherwise

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mlsys.errors import MlsysError  # noqa: E402
from mlsys.spec import DataSpec  # noqa: E402


class ExportError(MlsysError):
    """The model could not be exported, or the export does not compute what the model computes."""


def export_view(model: nnx.Module) -> nnx.Module:
    """Evaluation mode; for the decoders a sliced mask table (jax2onnx needs it for a symbolic length) and a scanned
    layer stack unrolled (one graph node per layer, rather than a loop)."""
    return nnx.view(model, deterministic=True, use_running_average=True, explicit_mask=True, unroll_layers=True,
                    raise_if_not_found=False)


def input_signature(spec: DataSpec, max_len: int | None):
    """(ONNX input description for jax2onnx, named shape for the manifest)."""
    if spec.task == "lm":
        constraints = [f"{max_len} >= T"] if max_len else []
        shape = jax.export.symbolic_shape("B, T", constraints=constraints)
        return jax.ShapeDtypeStruct(shape, jnp.int32), ["B", "T"]
    return ("B", *spec.input_shape), ["B", *spec.input_shape]


def quiet_onnx_ir() -> None:
    """onnx_ir warns once per intermediate value jax2onnx leaves untyped ("The value type for shape [1] is not
    known ... Skipping serialization"): only optional shape annotations are skipped — onnx.checker and the parity
    gates check the graph itself — yet it is a dozen lines per layer on every export."""
    logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)


def to_onnx(model: nnx.Module, spec: DataSpec, path: str, max_len: int | None = None) -> dict:
    import jax2onnx
    import onnx

    quiet_onnx_ir()

    sig, named = input_signature(spec, max_len)
    view = export_view(model)
    try:
        proto = jax2onnx.to_onnx(view, [sig], model_name="mlsys")
    except Exception as e:
        raise ExportError(f"jax2onnx cannot convert this model: {type(e).__name__}: {str(e).splitlines()[0][:300]} "
                          f"(in {_layer_of(e, view, spec)}). ONNX export needs operations jax2onnx supports; the "
                          f"PyTorch export covers the built-in families.") from None
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    out_named = ["B", "T", "V"] if spec.task == "lm" else ["B", "C"]
    return {"inputs": [{"name": proto.graph.input[0].name, "shape": named, "dtype": str(spec.input_dtype)}],
            "outputs": [{"name": proto.graph.output[0].name, "shape": out_named, "dtype": "float32"}]}


def _layer_of(e: Exception, model: nnx.Module, spec: DataSpec) -> str:
    """The model code that used the operation jax2onnx names: found in the model's jaxpr by primitive name, with
    the source line JAX recorded for it."""
    import re

    from jax._src import source_info_util  # summarize(): "file:line:col (function)"

    found = re.search(r"primitive '([\w\-]+)'", str(e))
    if not found:
        return "an unknown layer"
    shape = (2, *spec.input_shape)
    x = jnp.zeros(shape, jnp.int32 if spec.task == "lm" else jnp.float32)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == found.group(1):
                return source_info_util.summarize(eqn.source_info)
            for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
                hit = walk(sub)
                if hit:
                    return hit
        return None

    try:
        where = walk(jax.make_jaxpr(lambda x: model(x))(x).jaxpr)
    except Exception:  # the model may not even trace at this shape; the operation's name is still given
        where = None
    return f"{found.group(1)} at {where}" if where else f"operation {found.group(1)}"


def ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def quantize_int8(src: str, dst: str) -> None:
    """Dynamic INT8 quantization of the weights (activations quantized on the fly)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
