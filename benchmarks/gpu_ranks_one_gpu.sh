#!/usr/bin/env bash
# On the lent 1-GPU host: rehearse the block-parallel job's GPU path (two ranks of one torch.distributed job,
# launched as two "hosts" with --nodes 2 on the same machine and both on GPU 0) against a sequential build of
# the same slice, back to back. The slice has the 212B layer width with fewer experts, so that two ranks'
# tuning fits one GPU. Needs the wheels of docs/benchmarks.md in .whl/.
#   LAYERS=4 EXPERTS=64 ITERS=20 bash benchmarks/gpu_ranks_one_gpu.sh
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
LAYERS=${LAYERS:-4} EXPERTS=${EXPERTS:-64} ITERS=${ITERS:-20} WORK=${WORK:-/tmp/reap-ranks} OUT=${OUT:-$WORK/out}
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/make_slice.py "$WORK/slice" --layers "$LAYERS" --experts "$EXPERTS" --device cuda
build() {
  python3 -m reap build recipes/demo.yaml --model "$WORK/slice" --iters "$ITERS" --nsamples 64 --tp 4 \
    --set name=slice-w4a16 --set model.base_model=random-init-212b-width-slice --set quantize.seqlen=512 \
    --set quantize.dataset="$WORK/slice/calibration.jsonl" --set quantize.device_map=0 "$@"
}
build --out "$WORK/seq" > "$OUT/seq.log" 2>&1
hosts="--gpus 1 --nodes 2 --master 127.0.0.1:29555"
# shellcheck disable=SC2086
build --out "$WORK/par" $hosts --node-rank 1 > "$OUT/node1.log" 2>&1 &
# shellcheck disable=SC2086
build --out "$WORK/par" $hosts --node-rank 0 > "$OUT/node0.log" 2>&1 || true
wait || true
python3 benchmarks/parallel_compare.py "$WORK/seq" "$WORK/par" --json "$OUT/compare.json" > "$OUT/compare.txt" 2>&1 || true
tail -n 12 "$OUT/seq.log" "$OUT/node0.log" "$OUT/node1.log" "$OUT/compare.txt"
