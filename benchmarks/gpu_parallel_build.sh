#!/usr/bin/env bash
# On a lent multi-GPU NVIDIA host (docs/benchmarks.md): `reap build` of a random-init Qwen3.5-MoE with the real
# 212B layer width, sequentially on one GPU and block-parallel on N GPUs, same host, same recipe, same source.
# Needs the wheels in .whl/ (auto-round, pydantic, datasets, transformers 5.19: see the doc). Three phases so
# that each fits one 10-minute device call (the warm host keeps /tmp between back-to-back calls; slice and
# sequential build together overran 600 s once):
#   PHASE=slice LAYERS=8 bash benchmarks/gpu_parallel_build.sh          # the random-init slice
#   PHASE=seq ITERS=20 bash benchmarks/gpu_parallel_build.sh            # sequential build on GPU 0
#   PHASE=par GPUS=4 ITERS=20 bash benchmarks/gpu_parallel_build.sh     # parallel build + comparison
# A dry run on a CPU machine: PY=.venv/bin/python DEVICE=cpu DEVICE_MAP=cpu EXPERTS=8 LAYERS=4 ITERS=2 NSAMPLES=4 \
#   SEQLEN=64 PAR_ARGS="--set quantize.parallel=2" bash benchmarks/gpu_parallel_build.sh
set -euo pipefail
PY=${PY:-python3}
if [ -d .whl ] && [ "$PY" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
LAYERS=${LAYERS:-8} EXPERTS=${EXPERTS:-268} ITERS=${ITERS:-20} NSAMPLES=${NSAMPLES:-64} SEQLEN=${SEQLEN:-512}
GPUS=${GPUS:-4} WORK=${WORK:-/tmp/reap-par} PHASE=${PHASE:-all} DEVICE=${DEVICE:-cuda} DEVICE_MAP=${DEVICE_MAP:-0}
PAR_ARGS=${PAR_ARGS:---gpus $GPUS}
build() {  # build OUT [extra args]
  local out=$1; shift
  "$PY" -m reap build recipes/demo.yaml --model "$WORK/slice" --out "$out" --iters "$ITERS" --nsamples "$NSAMPLES" \
    --tp 4 --set name=qwen3.5-212b-width-slice-w4a16 --set model.base_model=random-init-212b-width-slice \
    --set quantize.seqlen="$SEQLEN" --set quantize.dataset="$WORK/slice/calibration.jsonl" \
    --set quantize.device_map="$DEVICE_MAP" "$@"
}
if [ "$PHASE" = slice ] || [ "$PHASE" = all ]; then
  rm -rf "$WORK" && mkdir -p "$WORK"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  free -g | head -2; nproc
  "$PY" benchmarks/make_slice.py "$WORK/slice" --layers "$LAYERS" --experts "$EXPERTS" --device "$DEVICE"
  du -sh "$WORK/slice"
fi
if [ "$PHASE" = seq ] || [ "$PHASE" = all ]; then
  rm -rf "$WORK/run-1"
  build "$WORK/run-1"
  if [ -n "${OUT:-}" ]; then cp "$WORK/run-1/manifest.json" "$OUT/manifest-1.json"; fi
fi
if [ "$PHASE" = par ] || [ "$PHASE" = all ]; then
  rm -rf "$WORK/run-$GPUS"
  # shellcheck disable=SC2086
  build "$WORK/run-$GPUS" $PAR_ARGS
  "$PY" benchmarks/parallel_compare.py "$WORK/run-1" "$WORK/run-$GPUS" --skip-identity ${OUT:+--json "$OUT/compare.json"}
  if [ -n "${OUT:-}" ]; then cp "$WORK/run-$GPUS/manifest.json" "$OUT/manifest-$GPUS.json"; fi
fi
