"""The served model: a verified export folder, its ONNX Runtime session, and what a request must look like."""

import json
import os
from dataclasses import dataclass

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # onnxruntime writes telemetry files otherwise

import numpy as np  # noqa: E402

from mlsys.errors import ConfigError, MlsysError  # noqa: E402
from mlsys.serve.config import ServeConfig  # noqa: E402
from mlsys.serve.decoder import session  # noqa: E402


@dataclass
class InputSpec:
    name: str
    kind: str  # "array" (fixed shape floats) or "tokens" (variable length int ids)
    shape: tuple  # one example: (8, 8, 1) for digits; (None,) for tokens
    dtype: str
    lo: float = -np.inf  # accepted value range (arrays)
    hi: float = np.inf
    vocab_size: int = 0  # token ids must be < vocab_size
    max_length: int = 0  # tokens per example


class ServedModel:
    def __init__(self, cfg: ServeConfig):
        from mlsys.export.manifest import verify

        if not os.path.isdir(cfg.model):
            raise ConfigError(f"model={cfg.model!r}: no such folder; give an export folder written by "
                              f"python -m experiments.export (…/export/step_N)")
        # Refuse to serve anything whose files or signature do not match: verify raises VerifyError naming the file.
        self.manifest = verify(cfg.model, cfg.public_key or None)
        files = self.manifest["files"]
        onnx_file = "model.onnx" if cfg.precision == "fp32" else "model.int8.onnx"
        if onnx_file not in files:
            raise ConfigError(f"serve.precision={cfg.precision}: {cfg.model} has no {onnx_file}; "
                              + ("export with quantize=int8" if cfg.precision == "int8" else "export with format=onnx"))
        if "reference_stats.json" not in files:
            raise ConfigError(f"model={cfg.model!r}: no reference_stats.json (exported by an older mlsys); export the "
                              f"run again to serve it with drift monitoring and input ranges")
        self.reference = json.load(open(os.path.join(cfg.model, "reference_stats.json")))
        src = self.manifest.get("source", {})
        self.version = f"{self.manifest['family']}-step{src.get('step')}-{files[onnx_file][:12]}"
        self.session = session(os.path.join(cfg.model, onnx_file), cfg.threads)
        self.input = self._input_spec(cfg)
        self.output_name = self.manifest["onnx"]["outputs"][0]["name"]
        # Language models: the tokenizer and the KV-cache decoder that text generation runs on (None otherwise).
        self.tokenizer, self.decoder = self._language_model(cfg) if self.input.kind == "tokens" else (None, None)

    def _language_model(self, cfg: ServeConfig) -> tuple:
        """(tokenizer, Decoder) of an LM export, for text generation; one-line errors when either is missing. With
        serve.completions=false (logits only) neither is needed. A family without a KV-cache decoder (exported
        with "decoder": null) serves logits only: (tokenizer, None)."""
        from mlsys import tokenizer as tokenizers
        from mlsys.serve.decoder import Decoder, rerun_command

        if not getattr(cfg, "completions", True):
            return None, None
        name = (self.manifest["preprocessing"].get("tokenizer") or {}).get("file")
        if not name or name not in self.manifest["files"]:
            raise ConfigError(f"model={cfg.model!r}: the language-model export has no tokenizer "
                              f"({name or 'vocab.json/tokenizer.json'} not in the manifest), so it cannot serve text; "
                              f"export the run again ({rerun_command(self.manifest)}) or serve logits only with "
                              f"serve.completions=false")
        path = os.path.join(cfg.model, name)
        tok = (tokenizers.load_file(path) if name.endswith("tokenizer.json")
               else tokenizers.from_vocab(json.load(open(path))))
        if self.manifest.get("decoder", "absent") is None:
            return tok, None
        return tok, Decoder(cfg.model, cfg.precision, cfg.threads, self.manifest)

    def _input_spec(self, cfg: ServeConfig) -> InputSpec:
        (inp,) = self.manifest["onnx"]["inputs"]
        pre, ref = self.manifest["preprocessing"], self.reference
        if pre["kind"] == "tokens":
            return InputSpec(inp["name"], "tokens", (None,), "int32", vocab_size=int(ref["vocab_size"]),
                             max_length=int(pre.get("max_length") or 0))
        if any(not isinstance(d, int) for d in inp["shape"][1:]):
            raise MlsysError(f"{cfg.model}: input shape {inp['shape']} has symbolic dims besides the batch")
        span = ref["hi"] - ref["lo"]
        return InputSpec(inp["name"], "array", tuple(inp["shape"][1:]), inp["dtype"],
                         lo=ref["lo"] - cfg.range_tolerance * span, hi=ref["hi"] + cfg.range_tolerance * span)

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input.name: x})[0]

    def public_manifest(self) -> dict:
        """The manifest without what a client has no business knowing (local paths of the training machine)."""
        m = json.loads(json.dumps(self.manifest))
        src = m.get("source", {})
        src.pop("run_dir", None)
        if isinstance(src.get("git"), dict):
            src["git"] = {k: v for k, v in src["git"].items() if k in ("commit", "dirty")}
        inp = self.input
        m["version"] = self.version
        m["accepts"] = ({"kind": "tokens", "vocab_size": inp.vocab_size, "max_length": inp.max_length}
                        if inp.kind == "tokens" else
                        {"kind": "array", "shape": list(inp.shape), "dtype": inp.dtype, "min": inp.lo, "max": inp.hi})
        return m
