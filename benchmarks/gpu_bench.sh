#!/usr/bin/env bash
# `reap bench --baseline` on a lent 1-GPU NVIDIA host (docs/benchmarks.md, "reap bench on an NVIDIA H200"): the
# 4-layer slice with the 212B layer width, built W4A16 by `reap build` (RTN), against its bf16 source, tp 1.
# Meant to run in the background (setsid) while the vLLM wheels are still being uploaded:
#   PHASE=slice  bash benchmarks/gpu_bench.sh   # the slice (torch + transformers of the host image only)
#   PHASE=rest   bash benchmarks/gpu_bench.sh   # unpack the staged wheels, build, bench; summary in $WORK/out
# Needs ~/stage/part_* (../shared/gpu/stage-wheels.sh) and the transformers 5.19.0 wheel in $TF_WHEEL_DIR.
set -uo pipefail
WORK=${WORK:-/root/reap-bench} SRC=${SRC:-$PWD} CONC=${CONC:-1,32}
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
mkdir -p "$WORK/out"
step() { echo "[$(date +%T)] $*"; }

if [ "${PHASE:-}" = slice ]; then
  export PYTHONPATH="$SRC/src"
  step "slice start"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 "$SRC/benchmarks/make_slice.py" "$WORK/slice" --layers 4 --experts 268 --device cuda && touch "$WORK/slice.done"
  du -sh "$WORK/slice"; step "slice end"
  exit 0
fi

step "unpack wheels"
cat ~/stage/part_* > ~/b.tar && mkdir -p ~/w && tar xf ~/b.tar -C ~/w \
  && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site ~/w/*.whl \
  && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/tf519 "$TF_WHEEL_DIR"/*.whl || exit 1
while [ ! -f "$WORK/slice.done" ]; do sleep 2; done
step "build start (transformers 5.19 for AutoRound)"
PYTHONPATH=~/tf519:~/site:$SRC/src python3 -m reap build "$SRC/recipes/demo.yaml" --model "$WORK/slice" \
  --out "$WORK/run" --iters 0 --tp 1 --set name=qwen3.5-212b-shaped-slice-w4a16 \
  --set model.base_model=random-init-212b-shaped-slice --set quantize.dataset="$WORK/slice/calibration.jsonl" \
  --set quantize.device_map=0 --set quantize.routed_experts=quantize > "$WORK/out/build.txt" 2>&1 || exit 1
tail -12 "$WORK/out/build.txt"
step "bench start (transformers of the image for vLLM)"
export PYTHONPATH=~/site:$SRC/src
python3 -m reap bench "$WORK/run" --baseline --concurrency "$CONC" --port 8100 -- --gdn-prefill-backend triton \
  > "$WORK/out/bench.txt" 2>&1
echo "bench exit $?"; tail -20 "$WORK/out/bench.txt"
cp "$WORK/run/manifest.json" "$WORK/out/manifest.json"; cp "$WORK/run/model/README.md" "$WORK/out/card.md"
cp "$WORK/run/model/serving_throughput.png" "$WORK/out/" 2>/dev/null
tail -c 20000 "$WORK/run/logs/serve-bench-quantized.log" > "$WORK/out/serve-quantized.log"
tail -c 20000 "$WORK/run/logs/serve-bench-baseline.log" > "$WORK/out/serve-baseline.log"
step "done"; touch "$WORK/out/done"
