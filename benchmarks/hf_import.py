"""Peak host memory of a Hugging Face import against the model's size: python -m benchmarks.hf_import [params=150e6]
[mesh=single|fsdp] [dir=/tmp/mlsys_hf_bench].

Builds a random LlamaForCausalLM (fp32, untied, grouped-query attention) of about `params` parameters with
transformers, saves it with save_pretrained (once; reused), then runs experiments.import_hf on it in a fresh
process and reports that process's peak RSS (ru_maxrss) beside its RSS before the import began (Python, jax,
orbax loaded) and the weights' bytes. The import holds the arrays it builds plus one block of one tensor: the goal
is peak - baseline close to 1x the weights (never 2x)."""

import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, time
sys.argv = ["import_hf"]
import jax, orbax.checkpoint  # noqa: F401  (the baseline includes the libraries the import needs)
from mlsys.hf.importer import import_folder
from mlsys.parallel import MeshConfig
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
base = rss_mb()
mesh = MeshConfig(shape={"data": 1, "fsdp": -1, "tensor": 1}) if os.environ["BENCH_MESH"] == "fsdp" else None
t0 = time.perf_counter()
import_folder(os.environ["BENCH_SRC"], os.environ["BENCH_OUT"], mesh)
print(json.dumps({"baseline_mb": base, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
"""


def build(folder: str, params: float) -> int:
    """A random Llama of about `params` parameters saved in `folder`; returns its weights' bytes."""
    if not os.path.isfile(os.path.join(folder, "model.safetensors")) and \
            not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        import torch
        import transformers

        d, layers = 768, max(1, round((params - 2 * 32000 * 768) / 6.3e6))
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=d, intermediate_size=2048,
                                       num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                                       max_position_embeddings=1024, tie_word_embeddings=False)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main(argv: list[str]) -> None:
    a = dict(x.split("=", 1) for x in argv)
    root = a.get("dir", "/tmp/mlsys_hf_bench")
    src, mesh = os.path.join(root, "llama"), a.get("mesh", "single")
    size = build(src, float(a.get("params", 150e6)))
    out = os.path.join(root, f"run_{mesh}_{os.getpid()}")
    env = dict(os.environ, BENCH_SRC=src, BENCH_OUT=out, BENCH_MESH=mesh,
               XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = json.loads(subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    weights = size / 2**20
    extra = res["peak_mb"] - res["baseline_mb"]
    print(f"mesh={mesh}: weights {weights:.0f} MB; RSS before import {res['baseline_mb']:.0f} MB, peak "
          f"{res['peak_mb']:.0f} MB: +{extra:.0f} MB = {extra / weights:.2f}x the weights; {res['seconds']:.1f} s")
    import shutil

    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
