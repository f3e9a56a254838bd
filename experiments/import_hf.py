"""Import a local Hugging Face model folder as an mlsys run dir: python -m experiments.import_hf <folder>
[out=<run dir>] [mesh=single|fsdp|data|fsdp_tp]. GPT-2 and Llama-architecture models (Mistral, Qwen2 where they map
the same); safetensors only (pytorch_model.bin is refused with the command that converts it). The run dir then
works with experiments.export, experiments.generate, experiments.serve and trainer.init_from=<run dir>; or skip
this step and fine-tune straight from the folder with trainer.init_from=hf:<folder>."""

import sys

from mlsys.cli import friendly_errors, key_values
from mlsys.errors import ConfigError

ARGS = {"out": "the run dir to write (default: runs/hf_import/<folder name>)",
        "mesh": "conf/mesh preset to place the weights on (default: single)"}


@friendly_errors
def main(argv: list[str]) -> None:
    folders = [a for a in argv if "=" not in a]
    if len(folders) != 1:
        raise ConfigError("give one Hugging Face model folder, e.g. python -m experiments.import_hf ./gpt2 "
                          "out=runs/gpt2_hf")
    a = key_values([x for x in argv if "=" in x], ARGS)
    from omegaconf import OmegaConf

    from mlsys.hf.importer import import_folder
    from mlsys.parallel import MeshConfig

    mesh = None
    if a.get("mesh"):
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "mesh",
                            f"{a['mesh']}.yaml")
        if not os.path.isfile(path):
            raise ConfigError(f"mesh={a['mesh']!r}: no such preset in conf/mesh; use single, data, fsdp or fsdp_tp")
        raw = OmegaConf.load(path)
        mesh = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MeshConfig), {"shape": raw.shape}))
    print(f"imported: {import_folder(folders[0], a.get('out'), mesh)}")


if __name__ == "__main__":
    main(sys.argv[1:])
