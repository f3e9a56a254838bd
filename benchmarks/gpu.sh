#!/usr/bin/env bash
# Every GPU arm in one go: +exp=gpt2_124m's training step (mlsys) against hand-written JAX and PyTorch
# torch.compile of the same model and batch, 5 interleaved repeats each, one table. Under 7 minutes on one H100/H200.
#   bash benchmarks/gpu.sh            # GPU, GPT-2 124M
#   SIZE=tiny bash benchmarks/gpu.sh  # the same arms at a size any CPU runs in seconds (what the tests run)
#   bash benchmarks/gpu.sh wheels     # on a machine with network: fill benchmarks/wheels for an offline GPU box
# Self-contained on a fresh GPU image (JAX with CUDA, Flax, optax, orbax, torch; no Hydra, grain, ...): the
# pure-Python packages mlsys needs and the image lacks go into $OUT/deps (put on PYTHONPATH; the image's jax, torch
# and CUDA stay untouched), from benchmarks/wheels when that folder has them, else from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-gpt2}
REPEATS=${REPEATS:-5}
STEPS=${STEPS:-30}
PY=${PY:-python}
OUT=${OUT:-benchmarks/results}
WHEELS=${WHEELS:-benchmarks/wheels}
# module -> the distribution that provides it (pinned as in constraints.txt; installed with --no-deps).
NEEDS="hydra:hydra-core==1.3.8 omegaconf:omegaconf==2.3.1 antlr4:antlr4-python3-runtime==4.9.3 grain:grain==0.2.18
array_record:array-record==0.8.6 portpicker:portpicker==1.6.0 jaxtyping:jaxtyping==0.3.11
wadler_lindig:wadler-lindig==0.1.8 beartype:beartype==0.23.1 tqdm:tqdm==4.70.1 yaml:pyyaml==6.0.4"
if [ "${1:-}" = wheels ]; then  # GPU machines run Python 3.12 on x86-64 Linux
  mkdir -p "$WHEELS"
  for spec in $NEEDS; do
    dist=${spec#*:}
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "$dist" 2>/dev/null \
      || $PY -m pip wheel -q --no-deps -w "$WHEELS" "$dist"  # antlr4 is published as an sdist only
  done
  ls "$WHEELS"; exit 0
fi
mkdir -p "$OUT"
missing=$(for spec in $NEEDS; do $PY -c "import ${spec%%:*}" 2>/dev/null || printf "%s " "${spec#*:}"; done)
if [ -n "$missing" ]; then
  echo "installing into $OUT/deps what this image lacks: $missing"
  src=(); [ -d "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
  $PY -m pip install -q --no-deps --target "$OUT/deps" "${src[@]}" $missing \
    || { echo "error: could not install $missing; on a machine with network run: bash benchmarks/gpu.sh wheels" \
         "and copy benchmarks/wheels here" >&2; exit 2; }
  export PYTHONPATH="$OUT/deps${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu_card.txt" || true
$PY -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" | tee "$OUT/gpu_versions.txt"
for r in $(seq "$REPEATS"); do
  for arm in mlsys jax torch-compile; do
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" $PY -m benchmarks.arm --arm "$arm" --size "$SIZE" --steps "$STEPS" | tee -a "$OUT/gpu_$SIZE.jsonl"
  done
done
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" $PY - "$OUT/gpu_$SIZE.jsonl" "$SIZE" <<'PYEOF'
import json, statistics, sys
from benchmarks.sizes import SIZES
rows = [json.loads(l) for l in open(sys.argv[1])]
s = SIZES[sys.argv[2]]
n = 12 * s.n_layer * s.d_model ** 2 + s.vocab * s.d_model  # parameters without position embeddings
flops_token = 6 * n + 12 * s.n_layer * s.d_model * s.seq_len
try:
    import jax
    from mlsys.perf import peak_tflops
    peak, source = peak_tflops(jax.devices()[0].device_kind)
except Exception:
    peak, source = 0.0, "unknown"
print(f"| arm | ms/step | tokens/s | MFU ({source}, {peak:.3g} TFLOP/s) |\n|---|---|---|---|")
for arm in dict.fromkeys(r["arm"] for r in rows):
    ms = statistics.median(r["ms_per_step"] for r in rows if r["arm"] == arm)
    tps = s.batch * s.seq_len / (ms / 1e3)
    print(f"| {arm} | {ms:.2f} | {tps:,.0f} | {tps * flops_token / (peak * 1e12):.3f} |" if peak else f"| {arm} | {ms:.2f} | {tps:,.0f} | - |")
PYEOF
