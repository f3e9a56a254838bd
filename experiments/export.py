"""Export a trained run: python -m experiments.export run=<run dir> [step=N] [format=onnx,torch,hf,peft] [quantize=int8]
[out=<folder>] [decoder=false]

format: onnx, torch (the default pair), hf (a Hugging Face folder, hf/), peft (a LoRA run's adapter in PEFT's layout,
hf_adapter/, with its base model, hf_base/); several at once: format=onnx,torch,hf
decoder=false: a language model without its KV-cache decoder (decoder.onnx/.pt2) and that decoder's generation gate,
a quicker export whose server answers /v1/predict (logits) but not /v1/completions"""

import sys

from mlsys.cli import friendly_errors, key_values
from mlsys.errors import ConfigError

ARGS = {"run": "a run dir", "step": "a checkpoint step (default: the latest)", "format": "onnx,torch,hf,peft",
        "quantize": "int8", "out": "the export folder (default: <run>/export/step_<N>)",
        "decoder": "true or false (language models: false leaves out the KV-cache decoder; default true)"}


@friendly_errors
def main(argv: list[str]) -> None:
    a = key_values(argv, ARGS)
    if "run" not in a:
        raise ConfigError("run=<run dir> is required, e.g. python -m experiments.export run=runs/digits_mlp/<time>")
    from mlsys.export import export_run

    step = int(a["step"]) if a.get("step") else None
    if a.get("decoder", "true") not in ("true", "false"):
        raise ConfigError(f"decoder={a['decoder']!r}: expected true or false")
    out = export_run(a["run"], step, tuple(a.get("format", "onnx,torch").split(",")), a.get("quantize"), a.get("out"),
                     decoder=a.get("decoder", "true") == "true")
    print(f"export: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
