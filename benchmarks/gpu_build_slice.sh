#!/usr/bin/env bash
# On a lent NVIDIA host (docs/benchmarks.md): `reap build` of a random-init Qwen3.5-MoE with the real 212B
# layer shapes. Needs the wheels in .whl/ (auto-round, pydantic, datasets, transformers 5.19: see the doc).
#   LAYERS=4 ITERS=20 NSAMPLES=64 SEQLEN=512 TP=4 bash benchmarks/gpu_build_slice.sh
# EXTRA adds recipe settings, e.g. EXTRA="--set quantize.expert_tuning=stacked" (docs/benchmarks.md, one block).
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
LAYERS=${LAYERS:-4} EXPERTS=${EXPERTS:-268} ITERS=${ITERS:-20} NSAMPLES=${NSAMPLES:-64} SEQLEN=${SEQLEN:-512}
TP=${TP:-4} DEVICE=${DEVICE:-cuda} DEVICE_MAP=${DEVICE_MAP:-0} WORK=${WORK:-/tmp/reap-bench}
rm -rf "$WORK" && mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/make_slice.py "$WORK/slice" --layers "$LAYERS" --experts "$EXPERTS" --device "$DEVICE"
du -sh "$WORK/slice"
python3 -m reap build recipes/demo.yaml --model "$WORK/slice" --out "$WORK/run" \
  --iters "$ITERS" --nsamples "$NSAMPLES" --tp "$TP" \
  --set name=qwen3.5-212b-shaped-slice-w4a16 --set model.base_model=random-init-212b-shaped-slice \
  --set quantize.seqlen="$SEQLEN" --set quantize.dataset="$WORK/slice/calibration.jsonl" \
  --set quantize.device_map="$DEVICE_MAP" ${EXTRA:-}
if [ -n "${OUT:-}" ]; then cp "$WORK/run/manifest.json" "$OUT/manifest.json"; cp "$WORK/run/model/README.md" "$OUT/card.md"; fi
