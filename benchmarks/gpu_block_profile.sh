#!/usr/bin/env bash
# On a lent NVIDIA host (docs/benchmarks.md, "One block under AutoRound"): where the time of one 212B-width MoE
# block goes under AutoRound 0.16.1. Needs the wheels of auto-round, transformers 5.19, datasets, pydantic,
# loguru (as for gpu_build_slice.sh) in $WHEELS (default .whl/). Results: $OUT/profile-*.json.
#   ITERS=50 NSAMPLES=64 SEQLEN=512 bash benchmarks/gpu_block_profile.sh
set -euo pipefail
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
ITERS=${ITERS:-50} NSAMPLES=${NSAMPLES:-64} SEQLEN=${SEQLEN:-512} WORK=${WORK:-/tmp/reap-block} OUT=${OUT:-$WORK}
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_block_profile.py "$WORK" --iters "$ITERS" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" \
  --json "$OUT/profile-autoround-i$ITERS.json" ${EXTRA:-} > "$WORK/profile.log" 2>&1 || { tail -60 "$WORK/profile.log"; exit 1; }
grep -E "quantized [0-9]+/[0-9]+ layers|Summary|peak_ram|peak_vram" "$WORK/profile.log" | tail -5 || true
cat "$OUT/profile-autoround-i$ITERS.json"
