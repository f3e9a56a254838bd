#!/usr/bin/env bash
# Every GPU arm in one go: +exp=gpt2_124m's training step (mlsys) against hand-written JAX and PyTorch
# torch.compile of the same model and batch, 5 interleaved repeats each, one table. Under 7 minutes on one H100/H200.
#   bash benchmarks/gpu.sh            # GPU, GPT-2 124M
#   SIZE=tiny bash benchmarks/gpu.sh  # the same arms at a size any CPU runs in seconds (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-gpt2}
REPEATS=${REPEATS:-5}
STEPS=${STEPS:-30}
PY=${PY:-python}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu_card.txt" || true
$PY -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" | tee "$OUT/gpu_versions.txt"
for r in $(seq "$REPEATS"); do
  for arm in mlsys jax torch-compile; do
    PYTHONPATH=. $PY -m benchmarks.arm --arm "$arm" --size "$SIZE" --steps "$STEPS" | tee -a "$OUT/gpu_$SIZE.jsonl"
  done
done
$PY - "$OUT/gpu_$SIZE.jsonl" "$SIZE" <<'PYEOF'
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
