#!/usr/bin/env bash
# REAP against frequency, EAN and random pruning on wider demo MoEs (32 experts, top-4, trained with a
# load-balancing loss), several training seeds, on one GPU host (the device tool's nvidia-h200): docs/benchmarks.md.
# Needs torch + transformers (the host image has them); reap is taken from src/. Results: $OUT/compare-<seed>.json
# and $OUT/summary.md (logs in $WORK/logs, their tails printed on failure).
#   SEEDS="0 1 2" EXPERTS=32 TOPK=4 AUX=0.01 benchmarks/gpu_prune_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3} SEEDS=${SEEDS:-"0 1 2"} EXPERTS=${EXPERTS:-32} TOPK=${TOPK:-4} AUX=${AUX:-0.01} STEPS=${STEPS:-380}
WORK=${WORK:-/tmp/prune-bench} OUT=${OUT:-$WORK/out} RANDOM_SEEDS=${RANDOM_SEEDS:-5} LIMIT=${LIMIT:-}
LOGS=$WORK/logs
mkdir -p "$WORK" "$OUT" "$LOGS"
train() {  # the code path of `reap demo-model` (the CLI module needs pydantic, which the GPU image lacks)
  "$PY" - "$1" "$2" <<PY
import json, sys
from pathlib import Path
from reap.compat import ensure_torchvision_importable
ensure_torchvision_importable()
from reap.demo import build_demo_model
report = build_demo_model(Path(sys.argv[1]), steps=$STEPS, seed=int(sys.argv[2]), experts=$EXPERTS, top_k=$TOPK,
                          aux_loss=$AUX)
print(json.dumps(report))
PY
}
pids=()
for s in $SEEDS; do
  [ -d "$WORK/wide-$s" ] || { train "$WORK/wide-$s" "$s" > "$LOGS/train-$s.log" 2>&1 & pids+=($!); }
done
for p in "${pids[@]}"; do wait "$p" || { tail -5 "$LOGS"/train-*.log; exit 1; }; done
for s in $SEEDS; do tail -1 "$LOGS/train-$s.log"; done
# one comparison process per source, all on the one GPU (the models are tiny), then one summary over all
pids=()
for s in $SEEDS; do
  "$PY" benchmarks/prune_compare.py "$WORK/wide-$s" --out "$WORK/pruned-$s" --random-seeds "$RANDOM_SEEDS" ${LIMIT:+--limit "$LIMIT"} \
    --json "$OUT/compare-$s.json" --threads 2 > "$LOGS/compare-$s.log" 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -5 "$LOGS"/compare-*.log; exit 1; }; done
"$PY" benchmarks/prune_compare.py --merge "$OUT"/compare-*.json | tee "$OUT/summary.md"
