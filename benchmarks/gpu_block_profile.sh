#!/usr/bin/env bash
# On a lent NVIDIA host (docs/benchmarks.md, "One block of the 212B width"): where the time of one MoE block goes,
# under AutoRound 0.16.1's own expert tuning and under reap's stacked one (quantize.expert_tuning), on the same
# slice. Needs the wheels of auto-round, transformers 5.19, datasets, pydantic, loguru (as for
# gpu_build_slice.sh) in $WHEELS (default .whl/). Results: $OUT/profile-<path>-i<iters>.json.
#   PATHS="stacked autoround" ITERS=200 NSAMPLES=64 SEQLEN=512 bash benchmarks/gpu_block_profile.sh
set -uo pipefail
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
PATHS=${PATHS:-stacked autoround} ITERS=${ITERS:-200} NSAMPLES=${NSAMPLES:-64} SEQLEN=${SEQLEN:-512}
WORK=${WORK:-/tmp/reap-block} OUT=${OUT:-/tmp} LIMIT=${LIMIT:-300}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
keep=""
for path in $PATHS; do
  log="$OUT/profile-$path-i$ITERS.log"
  timeout "$LIMIT" python3 benchmarks/gpu_block_profile.py "$WORK" $keep --expert-tuning "$path" --iters "$ITERS" \
    --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --json "$OUT/profile-$path-i$ITERS.json" > "$log" 2>&1
  echo "== $path: exit $?"; grep -E "quantized [0-9]+/[0-9]+ layers|Error|error" "$log" | tail -4
  keep="--keep-slice"
done
