"""Export, step by step: a trained run → an export folder with ONNX, a PyTorch mirror (safetensors weights and a
self-contained torch.export program), a Hugging Face folder (hf/) and a LoRA run's PEFT adapter (hf_adapter/ on
hf_base/), optional INT8, and a signed manifest. Parity with JAX is part of export: if ONNX Runtime, torch or
transformers disagree with JAX beyond the tolerance on the run's own held-out data, export fails."""

import json
import os
import shutil
import time
from dataclasses import asdict

import jax
import numpy as np
from flax import nnx

from mlsys.config import load_saved
from mlsys.export.manifest import verify, write_signed
from mlsys.export.normalize import with_normalization
from mlsys.export.onnx_export import ExportError, ort_run, ort_session, quantize_int8, to_onnx
from mlsys.export.reference import reference_stats, spread_inputs
from mlsys.export.restore import LoadedRun, load_run
from mlsys.models import REGISTRY, family_of
from mlsys.models.lora import merge_lora
from mlsys.models.prune import pruning_report
from mlsys.trackers import mlflow_attach

FORMATS = ("onnx", "torch", "hf", "peft")
DEFAULT_FORMATS = ("onnx", "torch")  # hf and peft when asked for: they need transformers (and peft)


def held_out(run: LoadedRun, n: int = 64) -> np.ndarray:
    """Real inputs the model did not train on: the test split (else validation), spread over it."""
    return spread_inputs(run.dataset.splits.get("test") or run.dataset.splits["val"], n)


def parity(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> float:
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    if not diff <= tol:
        raise ExportError(f"parity failed: {name} differs from JAX by max |diff| = {diff:.3g} > {tol:g} on held-out "
                          f"inputs; the export was not written")
    return diff


def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(outputs.argmax(-1) == targets))


def export_run(run_dir: str, step: int | None = None, formats=DEFAULT_FORMATS, quantize: str | None = None,
               out: str | None = None, tol: float = 1e-4, decoder: bool = True) -> str:
    """Export a run; returns the export folder. Raises ExportError (and writes nothing) if parity fails.

    decoder=False: a language model's export leaves out the KV-cache decoder (decoder.onnx / decoder.pt2) and its
    generation gate, the slow part of an LM export; the manifest says "decoder": null and the server then serves
    logits only (/v1/predict, no /v1/completions). Every other file is written and gated as usual."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"format={','.join(formats)}: choose from {list(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r}: only int8 is supported")
    hf = "hf" in formats or "peft" in formats
    if hf and os.path.isdir(run_dir):  # what the saved config alone decides, before the slow restore
        from mlsys.export.hf_export import check_config

        check_config(load_saved(run_dir), formats)
    run = load_run(run_dir, step, merge="peft" not in formats)
    family, spec = family_of(run.cfg.model), run.dataset.spec
    unmerged = None
    if "peft" in formats:  # loaded unmerged: keep that model for the adapter, merge for every other format
        unmerged = nnx.clone(run.model)
        run.model = merge_lora(run.model)
    out = os.path.abspath(out or os.path.join(run.run_dir, "export", f"step_{run.step}"))
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        x = held_out(run)
        want = np.asarray(run.model(jax.numpy.asarray(x)))
        # Image runs: ONNX takes [0, 1] pixels, the training statistics inside the graph (x_raw: those pixels).
        onnx_model, to_raw = with_normalization(run.model, run.dataset.meta)
        x_raw = to_raw(x)
        manifest = {
            "family": family.name, "model_config": asdict(run.cfg.model), "data": run.cfg.data.name,
            "preprocessing": preprocessing(run, tmp), "source": {
                "run_dir": run.run_dir, "step": run.step, "experiment": run.cfg.name,
                "git": run.env.get("git"), "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            "data_fingerprint": run.env.get("data"),  # what the model was trained on (mlsys.data.fingerprint)
            "parity": {"tolerance": tol, "inputs": f"{len(x)} held-out examples"}, "formats": [],
        }
        if run.cfg.lora.rank:
            manifest["lora"] = {**asdict(run.cfg.lora), "merged": True, "init_from": run.cfg.trainer.init_from}
        max_len = family.max_len(run.cfg.model)
        if "onnx" in formats:
            manifest["onnx"] = to_onnx(onnx_model, spec, os.path.join(tmp, "model.onnx"), max_len)
            fp32 = ort_session(os.path.join(tmp, "model.onnx"))
            manifest["parity"]["onnx_max_abs_diff"] = parity("ONNX Runtime", ort_run(fp32, x_raw), want, tol)
            manifest["formats"].append("onnx")
            if quantize == "int8":
                manifest["int8"] = int8(run, tmp, fp32, to_raw)
                manifest["formats"].append("onnx-int8")
        if "torch" in formats:
            if "torch" in family.mirrors:
                from mlsys.export.torch_export import export_torch

                manifest["torch"] = export_torch(run, family, tmp, x, want, tol)
                manifest["parity"]["torch_max_abs_diff"] = manifest["torch"].pop("max_abs_diff")
                manifest["formats"].append("torch")
            else:
                manifest["torch"] = None
                mirrored = [n for n, f in REGISTRY.items() if "torch" in f.mirrors]
                print(f"note: model={family.name} has no PyTorch mirror: only ONNX is available (the PyTorch mirror "
                      f"exists for {', '.join(mirrored)})")
        if "hf" in formats:
            from mlsys.export.hf_export import export_hf

            manifest["hf"] = export_hf(run, tmp, x, want, tol, parity)
            manifest["parity"]["hf_max_abs_diff"] = manifest["hf"].pop("max_abs_diff")
            manifest["formats"].append("hf")
        if "peft" in formats:
            from mlsys.export.hf_peft import export_peft

            want_unmerged = np.asarray(unmerged(jax.numpy.asarray(x)))
            manifest["peft"] = export_peft(run, unmerged, tmp, x, want_unmerged, tol, parity, out)
            manifest["parity"]["peft_max_abs_diff"] = manifest["peft"].pop("max_abs_diff")
            manifest["formats"].append("peft")
        if spec.task == "lm" and {"onnx", "torch"} & set(formats):  # text generation: the KV-cache decoder
            manifest["decoder"] = export_lm_decoder(run, tmp, x, formats, quantize, tol) if decoder else None
        if run.cfg.prune.sparsity:  # the zeros stay in the files; how far they compress
            manifest["pruning"] = {**asdict(run.cfg.prune), **pruning_report(run.model, tmp)}
        manifest["reference_stats"] = write_reference(run, tmp, to_raw)
        write_signed(tmp, manifest)
        verify(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    mlflow_attach(run.run_dir, os.path.join(out, "manifest.json"))  # a run tracked in MLflow gets its manifest
    return out


def export_lm_decoder(run: LoadedRun, folder: str, x: np.ndarray, formats, quantize: str | None,
                      tol: float) -> dict | None:
    """decoder.onnx / decoder.pt2 for a model with a growing KV cache (Decoder.step: gpt, llama); None for other
    language models (their exports serve logits only). Two held-out prompts of different lengths (a ragged
    batch)."""
    if not hasattr(run.model, "step"):
        print(f"note: model={run.cfg.model.name} has no KV-cache decoder: the export has no decoder.onnx, so the "
              f"server cannot generate text with it")
        return None
    from mlsys.export.decoder_export import export_decoder

    # 64 new tokens after a 16-token prompt where the block has room; fewer (recorded) where it has not.
    n = min(x.shape[1], 16, max(4, family_of(run.cfg.model).max_len(run.cfg.model) - 64))
    prompts = [x[0, :n].tolist(), x[1, : max(1, n // 2)].tolist()]
    formats = [f for f in formats if f != "torch" or "torch" in family_of(run.cfg.model).mirrors]
    return export_decoder(run, folder, prompts, formats, quantize, tol)


def preprocessing(run: LoadedRun, folder: str | None = None) -> dict:
    """What a client does to its inputs. Language models: the run's tokenizer, copied into the export folder
    (vocab.json or tokenizer.json, hashed and signed with the rest)."""
    meta, tok = run.dataset.meta, run.dataset.tokenizer
    if tok is not None:
        if folder:
            tok.save(folder)
        out = {"kind": "tokens", "tokenizer": tok.describe(),
               "max_length": family_of(run.cfg.model).max_len(run.cfg.model)}
        if "vocab" in meta:
            out["vocab"] = meta["vocab"]
        return out
    norm = meta.get("normalization", "none")
    if isinstance(norm, dict):  # the ONNX model normalises: clients send the [0, 1] pixels
        norm = {**norm, "in_onnx_model": True}
    return {"kind": "array", "input_shape": list(run.dataset.spec.input_shape), "dtype": "float32",
            "normalization": norm}


def write_reference(run: LoadedRun, folder: str, to_raw=lambda x: x) -> str:
    """reference_stats.json: the training inputs' histograms (arrays) or token frequencies, for drift monitoring
    and input ranges in mlsys.serve; hashed and signed with the rest of the folder."""
    x = to_raw(spread_inputs(run.dataset.splits["train"]))  # what the exported model takes
    kind = "tokens" if run.dataset.spec.task == "lm" else "array"
    stats = reference_stats(x, kind, run.dataset.spec.num_classes if kind == "tokens" else None)
    with open(os.path.join(folder, "reference_stats.json"), "w") as f:
        json.dump(stats, f)
    return "reference_stats.json"


def int8(run: LoadedRun, folder: str, fp32, to_raw=lambda x: x) -> dict:
    src, dst = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.int8.onnx")
    quantize_int8(src, dst)
    q = ort_session(dst)
    info = {"size_ratio": os.path.getsize(src) / os.path.getsize(dst)}
    split = run.dataset.splits.get("test") or run.dataset.splits["val"]
    if run.dataset.spec.task == "classify":
        xs = to_raw(np.stack([split[i]["inputs"] for i in range(len(split))]))
        ys = np.stack([split[i]["targets"] for i in range(len(split))])
        info.update(accuracy_fp32=accuracy(ort_run(fp32, xs), ys), accuracy_int8=accuracy(ort_run(q, xs), ys),
                    examples=len(ys))
    return info


__all__ = ["export_run", "verify", "ExportError", "FORMATS"]
